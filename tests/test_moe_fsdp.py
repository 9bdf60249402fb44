"""EP composed with FSDP2 the way the trainer does it: EP over `ep`, experts FSDP-sharded
over `efsdp`, layers and root over `fsdp`; world 4 = efsdp 2 x ep 2. Reproduces the
single-process losses and gradients (fp32)."""

from __future__ import annotations

import torch.distributed as dist

from harness.loss import token_loss_sum
from harness.materialize import materialize
from harness.models import build_meta_model, decoder_layers, load_config, reference_model
from moe.expert_parallel import apply_expert_parallel
from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelDims
from tests.moe_common import SEED, batch, canonical, reference_step
from tests.multiproc import run_ranks


def _fsdp_ep(rank: int, world: int, preset: str) -> tuple[float, float, int]:
    config = load_config(preset, None)
    inputs, labels = batch(config.vocab_size)
    ref_loss, ref_grads = reference_step(config, inputs, labels)
    meshes = ParallelDims(ep=2, world_size=world).build_meshes("cpu")
    model = build_meta_model(config)
    experts = apply_expert_parallel(model, meshes.ep)
    apply_fsdp(model, decoder_layers(model), meshes.fsdp, reshard_after_forward=True,
               expert_modules=experts, expert_mesh=meshes.efsdp)
    materialize(model, reference_model(config, SEED), "cpu")
    loss = token_loss_sum(model(inputs[rank::world]).logits, labels[rank::world]) / labels.numel()
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {canonical(n): p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    return abs(total.item() - ref_loss), worst, len(grads)


def test_ep_with_fsdp_matches_single_process() -> None:
    loss_diff, grad_diff, count = run_ranks(_fsdp_ep, 4, "qwen3_moe")[0]
    assert count > 0 and loss_diff < 1e-5 and grad_diff < 1e-5, (loss_diff, grad_diff)
