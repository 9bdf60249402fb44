"""The start-up summary rank 0 prints: model, mesh, stages, checkpointing, MoE, kernels, data."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from harness import model_parts
from harness.config import Config
from harness.models import describe_weights
from harness.plan import Plan
from parallel.activation_checkpointing import resolved_optional_ops
from parallel.compile import compile_unavailable_reason
from parallel.cp_ring_attention import SAC_SAVE_OPS as cp_save_ops


def _kernels(device_type: str) -> str:
    grouped = "torch grouped_mm" if hasattr(F, "grouped_mm") else "per-expert loop"
    if device_type == "cuda":
        backends = torch.backends.cuda
        sdpa = "flash" if backends.flash_sdp_enabled() else "efficient" if backends.mem_efficient_sdp_enabled() else "math"
    else:
        sdpa = "cpu flash-attention kernel"
    return f"grouped GEMM: {grouped}; attention: sdpa ({sdpa})"


def _compile_line(requested: bool, device_type: str) -> str:
    if not requested:
        return "off (train.compile=false)"
    reason = compile_unavailable_reason(device_type)
    return f"off: {reason}" if reason else "each transformer block (inductor)"


def startup_summary(cfg: Config, plan: Plan, model_config: PretrainedConfig, model_class: str,
                    parameters: int, modules: list[nn.Module], corpus_tokens: int,
                    dispatcher: str | None) -> list[str]:
    """Collective: every rank calls it (stage contents are gathered); rank 0 gets the lines."""
    stages = [model_parts.describe(m) for m in modules]
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, stages)
    t, p, dims = cfg.train, cfg.parallel, plan.dims
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        f"model: {model_class} ({cfg.model.path or 'preset ' + cfg.model.preset}), {parameters:,} parameters, "
        f"{model_config.num_hidden_layers} layers, vocab {model_config.vocab_size}",
        f"weights: {describe_weights(model_config, cfg.train.seed, cfg.model.path)}",
        f"mesh: {dims.describe()} on {device_type} ({dist.get_backend()})",
    ]
    views: dict[str, list[str]] = {}  # the groups, as shown -> the views that have them
    for view, groups in dims.rank_groups().items():
        if len(groups[0]) > 1:
            views.setdefault(" ".join(str(g) for g in groups), []).append(view)
    lines += [f"  {', '.join(names)} groups: {shown}" for shown, names in views.items()]
    if dims.pp > 1:
        lines.append(f"pipeline: {p.pp_schedule}, {plan.pp_microbatches} microbatches per micro batch")
        lines += [f"  rank {rank}: " + " | ".join(s) for rank, s in enumerate(per_rank)
                  if rank in dims.rank_groups()["pp"][0]]
    ac = plan.ac_budget.describe() if plan.ac_budget is not None else plan.ac_mode
    lines.append(f"activation checkpointing: {ac}")
    if plan.ac_mode == "selective" or (plan.ac_budget is not None and "selective" in plan.ac_budget.layer_modes):
        from moe.ops import SAC_SAVE_OPS as moe_save_ops  # what harness/parallelize.py hands the AC module under EP

        extra = (*(moe_save_ops if dispatcher is not None else ()), *(cp_save_ops if dims.cp > 1 else ()))
        found = {name.removeprefix("torch.ops.").removesuffix(".default"): ok
                 for name, ok in resolved_optional_ops(extra).items()}
        # aten matmuls and attention always resolve; the collectives and backends are what varies.
        optional = {name: ok for name, ok in found.items() if not name.startswith("aten.")}
        lines.append("  saved when seen: " + (", ".join(n for n, ok in optional.items() if ok) or "none"))
        lines.append("  not available: " + (", ".join(n for n, ok in optional.items() if not ok) or "none"))
        if dims.tp > 1 and all(ok for name, ok in optional.items() if name.startswith("_c10d_functional")):
            lines.append("  tensor parallel: its collectives' outputs are saved, so recompute in backward issues "
                         "no TP collective")
    if dispatcher is not None:
        lines.append(f"moe: ep={dims.ep}, dispatcher {dispatcher}")
    randomness = model_parts.training_randomness(model_config)
    if randomness:
        lines.append("randomness: " + ", ".join(f"{k}={v}" for k, v in randomness.items())
                     + " drawn per rank and microbatch: another layout matches this run in distribution, not "
                       "bitwise")
    lines.append(f"kernels: {_kernels(device_type)}")
    lines.append(f"compile: {_compile_line(cfg.train.compile, device_type)}")
    source = "Python standard library sources (bytes)" if cfg.data.source == "stdlib" else cfg.data.source
    lines.append(f"data: {source}, {corpus_tokens:,} tokens; {t.global_batch_size} x {t.seq_len} = "
                 f"{t.global_batch_size * t.seq_len:,} tokens per step, gradient accumulation {plan.grad_accumulation}")
    return lines
