"""The one-process run every layout must reproduce: plain HF model, plain torch loop.

Written independently of the harness's trainer (whole global batch in one forward, torch's own
clip_grad_norm_), sharing only the data order, the weights and the LR formula with it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from harness.config import Config, load_config
from harness.data import BatchSampler, load_tokens
from harness.loss import count_tokens, token_loss_sum
from harness.model_parts import aux_loss_coefficient
from harness.models import load_config as load_model_config, reference_model
from harness.schedule import lr_factor


def reference_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    t = cfg.train
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)


def reference_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, labels: torch.Tensor,
                   max_grad_norm: float | None = None, chunk: int | None = None) -> tuple[float, float]:
    """One optimizer step on the whole batch: its mean token loss and the gradient norm before clipping.

    `chunk` splits the batch into forwards of that many rows; HF's router aux loss, when the model
    returns one, is added per chunk (it is not linear in the batch, so it needs the trainer's split).
    """
    rows = inputs.shape[0]
    chunk = chunk or rows
    with_aux = getattr(model.config, "output_router_logits", False)
    loss = torch.zeros(())
    for start in range(0, rows, chunk):
        outputs = model(input_ids=inputs[start:start + chunk])
        token_loss = token_loss_sum(outputs.logits, labels[start:start + chunk]) / count_tokens(labels)
        aux = outputs.aux_loss * aux_loss_coefficient(model.config) * chunk / rows if with_aux else 0.0
        (token_loss + aux).backward()
        loss += token_loss.detach()
    # Adam and clipping hide a wrong gradient scale from losses and parameters; the norm shows it.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf")).item()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item(), grad_norm


def reference_grads(config: PretrainedConfig, seed: int, inputs: torch.Tensor,
                    labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """One forward and backward of the HF model, no step: the mean token loss and every gradient by name."""
    model = reference_model(config, seed)
    loss = token_loss_sum(model(inputs).logits, labels) / labels.numel()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def reference_run(cfg: Config) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Per-step losses and gradient norms, and the final parameters, of the single-process run."""
    torch.set_num_threads(1)
    t = cfg.train
    model = reference_model(load_model_config(cfg.model.preset, cfg.model.path, cfg.model.overrides), t.seed,
                            cfg.model.path)
    optimizer = reference_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))
    sampler = BatchSampler(load_tokens(cfg.data), t.seq_len, t.global_batch_size, t.seed)
    loads = _count_expert_loads(model)
    chunk = _aux_loss_rows(cfg) if getattr(model.config, "output_router_logits", False) else None
    losses, grad_norms = [], []
    for step in range(t.steps):
        loss, grad_norm = reference_step(model, optimizer, *sampler.global_batch(step), t.max_grad_norm, chunk)
        scheduler.step()
        if cfg.moe.bias_update_rate:
            _update_biases(model, loads, cfg.moe.bias_update_rate)
        losses.append(loss)
        grad_norms.append(grad_norm)
    return losses, grad_norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _aux_loss_rows(cfg: Config) -> int:
    """Rows per forward the trainer takes HF's aux loss over: a micro batch, or under pipeline
    parallel one pipeline microbatch of it."""
    p = cfg.parallel
    return cfg.train.micro_batch_size // (p.pp_microbatches or p.pp) if p.pp > 1 else cfg.train.micro_batch_size


def _count_expert_loads(model: torch.nn.Module) -> dict[torch.nn.Module, torch.Tensor]:
    """Tokens routed to each expert since the last bias update, per MoE block's experts."""
    loads = {}
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if getattr(getattr(module, "gate", None), "e_score_correction_bias", None) is not None:
            loads[module] = torch.zeros(experts.num_experts)

            def count(experts_module, args, block=module):
                loads[block] += torch.bincount(args[1].flatten(), minlength=len(loads[block])).float()

            experts.register_forward_pre_hook(count)
    return loads


@torch.no_grad()
def _update_biases(model: torch.nn.Module, loads: dict, rate: float) -> None:
    for block, load in loads.items():
        block.gate.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        load.zero_()


def tiny_config(*overrides: str) -> Config:
    """A few fast steps on a small slice of the built-in corpus, in a run folder of its own (validation
    reads the run folder's checkpoints; nothing here writes one)."""
    base = ["--run.name=test_tiny", "--train.steps=3", "--train.global_batch_size=8", "--train.micro_batch_size=2",
            "--train.seq_len=32", "--train.lr=1e-2", "--train.warmup_steps=1", "--train.metrics_file=null",
            "--data.max_bytes=200000", "--logging.progress=false"]
    return load_config(None, [*base, *overrides])
