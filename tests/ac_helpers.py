"""Shared pieces of the activation-checkpointing tests: toy stacks, an op recorder, grad capture, a
rank's per-layer activation memory."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PretrainedConfig

from harness.config import Config
from harness.loss import token_loss_sum
from harness.materialize import canonical_name, materialize
from harness.model_parts import decoder_layers
from harness.models import build_meta_model, load_config as load_model_config, reference_model
from harness.rank_layout import on_fake_rank, rank_layout
from parallel.ac_budget import BUDGET_MODES, Measurement, StepShape, apply_budget_plan, measure_layers, track_step
from parallel.mesh import ParallelMeshes


class LinearReluStack(nn.Module):
    """`depth` bias-free Linear+ReLU pairs: bias-free so every matmul is an `aten.mm`."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width, bias=False), nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class StackModel(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3, blocks: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LinearReluStack(width, depth) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class OpRecorder(TorchDispatchMode):
    """Counts aten ops per phase: "forward" and "recompute" while a watched block's forward runs
    outside / inside backward, "other" elsewhere. Under SAC, saved ops are replayed from the
    cache during recompute and never reach this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.counts: dict[str, Counter] = {"forward": Counter(), "recompute": Counter(), "other": Counter()}

    def watch(self, block: nn.Module) -> None:
        """Attribute ops run inside `block`'s forward to "forward" or "recompute"."""
        def enter(*_: object) -> None:
            self._outer = self.phase
            self.phase = "recompute" if torch._C._current_graph_task_id() != -1 else "forward"

        def leave(*_: object) -> None:
            self.phase = self._outer

        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.phase][str(func)] += 1
        return func(*args, **(kwargs or {}))


def inner(module: nn.Module) -> nn.Module:
    return getattr(module, "_checkpoint_wrapped_module", module)


def lm_loss_and_grads(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token loss over `input_ids` and the gradients by canonical parameter name."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids[:, :-1]).logits
    loss = token_loss_sum(logits, input_ids[:, 1:])
    loss.backward()
    return loss.detach(), {canonical_name(n): p.grad.clone() for n, p in model.named_parameters()}


def assert_bitwise(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, f"gradients differ bitwise: {differing[:5]}"


def kept_bytes_on_rank(config: PretrainedConfig, meshes: ParallelMeshes, rows: int, seq_len: int) -> dict[str, list[int]]:
    """Per uniform AC mode: what each decoder layer of `config`'s model keeps for backward on this
    rank of the tensor- / context-parallel layout of `meshes`, on real tensors, measured as the
    budget's fake step measures it (`track_step`)."""
    layout = rank_layout(meshes, seq_len)
    shard = layout.sequence_shard
    input_ids = torch.randint(0, config.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    kept = {}
    for mode in BUDGET_MODES:
        model = build_meta_model(copy.deepcopy(config))  # context parallel renames its attention implementation
        layout.parallelize(model)
        layers = list(decoder_layers(model))
        apply_budget_plan(model, decoder_layers(model), [mode] * len(layers))
        materialize(model, reference_model(config, seed=0), "cpu")
        local_ids = shard.split(input_ids) if shard is not None else input_ids
        inputs = shard.model_inputs(rows, None, torch.device("cpu")) if shard is not None else {}
        kept[mode] = track_step(model, layers, local_ids, token_loss_sum, inputs)[1]
    return kept


def predicted_layers_and_budget_config(cfg: Config, tp: int, cp: int) -> tuple[Measurement, Config]:
    """The budget's per-layer measurement on one rank of `cfg`'s tp x cp layout (`cfg`'s model,
    micro batch and sequence length), and `cfg` under ac.mode=budget halfway between the peaks of
    full and no AC (a plan that mixes modes)."""
    meta = build_meta_model(load_model_config(cfg.model.preset, cfg.model.path, cfg.model.overrides))
    shape = StepShape(rows=cfg.train.micro_batch_size, seq_len=cfg.train.seq_len, dtype=torch.float32,
                      device_type="cpu")
    measurement = on_fake_rank(tp, cp, cfg.train.seq_len, lambda layout: measure_layers(
        meta, decoder_layers(meta), shape, token_loss_sum, layout=layout))
    peaks = measurement.uniform_peak_bytes
    budget_mib = (peaks["none"] + peaks["full"]) / 2 / 2**20
    return measurement, replace(cfg, ac=replace(cfg.ac, mode="budget", budget_mib=budget_mib))


def assert_kept_bytes_predicted(predicted: Measurement, kept: dict[str, list[int]], within: float = 0.02) -> None:
    """Each layer's measured kept bytes per mode (`kept_bytes_on_rank`) within `within` of the prediction."""
    for mode, measured in kept.items():
        expected = [cost.kept_bytes[mode] for cost in predicted.layers]
        for fake, real in zip(expected, measured, strict=True):
            assert abs(fake - real) <= within * real, (mode, expected, measured)
