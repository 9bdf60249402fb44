"""EP=2 and EP=4 reproduce the single-process HF model: losses and every gradient (fp32).

Each rank feeds its own slice of the batch; the loss is summed over tokens and divided by
the global token count, so dense gradients summed over ranks and the expert gradients that
EP already gathers from every rank both equal the reference's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from harness.loss import token_loss_sum
from harness.materialize import materialize
from harness.models import build_meta_model, load_config, reference_model
from moe.expert_parallel import apply_expert_parallel
from tests.multiproc import run_ranks

PRESETS = ("qwen3_moe", "mixtral", "deepseek_v3")
SEED = 0


def batch(vocab: int, rows: int = 4, seq: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def reference_step(config, inputs, labels) -> tuple[float, dict[str, torch.Tensor]]:
    model = reference_model(config, SEED)
    loss = token_loss_sum(model(inputs).logits, labels) / labels.numel()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def ep_model(config, world: int, dispatcher: str = "alltoall"):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    model = build_meta_model(config)
    experts = apply_expert_parallel(model, mesh, dispatcher)
    materialize(model, reference_model(config, SEED), "cpu")
    return model, experts


def full_grads(model) -> dict[str, torch.Tensor]:
    """Expert grads are gathered from their shards; dense grads summed over ranks' slices."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        if isinstance(param.grad, DTensor):
            grads[name] = param.grad.full_tensor()
        else:
            grad = param.grad.clone()
            dist.all_reduce(grad)
            grads[name] = grad
    return grads


def _compare_presets(rank: int, world: int) -> dict[str, tuple[float, float, int]]:
    results = {}
    for preset in PRESETS:
        config = load_config(preset, None)
        inputs, labels = batch(config.vocab_size)
        ref_loss, ref_grads = reference_step(config, inputs, labels)
        model, _ = ep_model(config, world)
        mine = slice(rank, None, world)
        loss = token_loss_sum(model(inputs[mine]).logits, labels[mine]) / labels.numel()
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = full_grads(model)
        assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
        worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
        results[preset] = (abs(total.item() - ref_loss), worst, len(grads))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_process_losses_and_grads(world: int) -> None:
    results = run_ranks(_compare_presets, world)[0]
    for preset, (loss_diff, grad_diff, count) in results.items():
        assert count > 0
        assert loss_diff < 1e-5, (preset, loss_diff)
        assert grad_diff < 1e-5, (preset, grad_diff)
