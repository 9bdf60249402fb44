"""Load balancing under expert parallel, and aux-loss-free balancing without it (pipeline stages).

Aux loss: HF's `outputs.aux_loss` on each rank's microbatch, scaled by `aux_loss_term`,
gives the same loss and gradients as the one-process model run on the same microbatches.
Aux-loss-free (DeepSeek-V3): tokens per expert are counted once per training forward, also
under activation checkpointing (whose recompute runs the forward again), and the bias step
uses the counts of every rank: all ranks end with the bias the global routing implies.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.distributed as dist
import transformers

from harness.loss import token_loss_sum
from harness.models import load_config, reference_model
from moe.balance import aux_loss_term, router_statistics, splits_over_stages, switch_aux_loss, update_expert_bias
from tests.families import decoder_only_families
from tests.moe_common import SEED, batch, canonical, ep_model, full_grads
from tests.layout_run import assert_matches_reference, train_layout
from tests.multiproc import run_ranks
from tests.reference import reference_run, tiny_config

RATE = 1e-3


def _aux_loss(rank: int, world: int) -> tuple[float, float]:
    config = load_config("qwen3_moe", None, {"output_router_logits": True})
    inputs, labels = batch(config.vocab_size)
    reference = reference_model(config, SEED)
    ref_total = 0.0
    for r in range(world):  # the same microbatches, one process
        out = reference(inputs[r::world])
        loss = token_loss_sum(out.logits, labels[r::world]) / labels.numel() + aux_loss_term(out, config.router_aux_loss_coef, world)
        loss.backward()
        ref_total += loss.item()
    model, _ = ep_model(config, world)
    out = model(inputs[rank::world])
    loss = token_loss_sum(out.logits, labels[rank::world]) / labels.numel() + aux_loss_term(out, config.router_aux_loss_coef, world)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = full_grads(model)
    router = [n for n in grads if "gate.weight" in n]
    assert router and all(reference.get_parameter(n).grad is not None for n in router)
    worst = max((grads[n] - reference.get_parameter(n).grad).abs().max().item() for n in grads)
    return abs(total.item() - ref_total), worst


def test_hf_aux_loss_matches_single_process() -> None:
    loss_diff, grad_diff = run_ranks(_aux_loss, 2)[0]
    assert loss_diff < 1e-6 and grad_diff < 1e-5, (loss_diff, grad_diff)


def _families_with_switch_loss() -> list[str]:
    """Decoder-only families whose modeling module defines HF's `load_balancing_loss_func`."""
    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    found = []
    for family in decoder_only_families():
        path = os.path.join(root, family, f"modeling_{family}.py")
        if os.path.exists(path) and "def load_balancing_loss_func(" in open(path).read():
            found.append(family)
    return found


# Families whose function of that name is another loss (Doge's takes its own router outputs):
# validation refuses their aux loss under pipeline parallel.
OTHER_AUX_LOSSES = {"doge"}


@pytest.mark.parametrize("family", _families_with_switch_loss())
def test_router_statistics_split_the_family_aux_loss(family: str) -> None:
    """Any split of the layers into stages gives the family's own aux loss and its gradients."""
    family_loss = importlib.import_module(f"transformers.models.{family}.modeling_{family}").load_balancing_loss_func
    experts, top_k = 6, 2
    if family in OTHER_AUX_LOSSES:
        assert not splits_over_stages(family_loss, experts, top_k)
        return
    generator = torch.Generator().manual_seed(1)
    logits = tuple(torch.randn(9, experts, generator=generator, requires_grad=True) for _ in range(4))
    expected = family_loss(logits, experts, top_k, None)
    stats = router_statistics(logits[:1], experts, top_k) + router_statistics(logits[1:3], experts, top_k)
    split = switch_aux_loss(stats + router_statistics(logits[3:], experts, top_k), experts)
    torch.testing.assert_close(split, expected, rtol=1e-6, atol=0)
    for got, want in zip(torch.autograd.grad(split, logits), torch.autograd.grad(expected, logits)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    assert splits_over_stages(family_loss, experts, top_k)


def test_another_aux_loss_does_not_split() -> None:
    def doubled(logits, experts, top_k, mask):
        return 2 * switch_aux_loss(router_statistics(logits, experts, top_k), experts)

    assert not splits_over_stages(doubled, 6, 2)
    assert not splits_over_stages(lambda logits, experts: 0.0, 6, 2)  # another signature


def _reference_counts(config, inputs) -> list[torch.Tensor]:
    """Tokens per expert of each MoE layer, from HF's router on the whole batch."""
    model = reference_model(config, SEED)
    counts = []
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda module, args, out: counts.append(torch.bincount(out[2].flatten(), minlength=config.n_routed_experts)))
        for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    model(inputs)
    for hook in hooks:
        hook.remove()
    return counts


def _bias_updates(rank: int, world: int) -> dict:
    return {mode: _bias_update(rank, world, mode) for mode in (None, "selective", "recompute_all")}


def _bias_update(rank: int, world: int, checkpointing: str | None) -> dict:
    config = load_config("deepseek_v3", None)
    inputs, labels = batch(config.vocab_size)
    model, experts = ep_model(config, world, checkpointing=checkpointing)
    loss = token_loss_sum(model(inputs[rank::world]).logits, labels[rank::world]) / labels.numel()
    loss.backward()
    local = [m._expert_load.clone() for m in experts]
    update_expert_bias(experts, RATE, dist.group.WORLD)
    expected = [RATE * torch.sign(c.float().mean() - c.float()) for c in _reference_counts(config, inputs)]
    biases = [m._correction_bias.router.e_score_correction_bias for m in experts]
    return dict(local_sum=[int(c.sum()) for c in local], tokens=inputs[rank::world].numel() * config.num_experts_per_tok,
                bias_error=max((b - e).abs().max().item() for b, e in zip(biases, expected)),
                reset=all(m._expert_load is None for m in experts),
                names=[canonical(n) for n, _ in model.named_buffers() if "e_score_correction_bias" in n])


def test_aux_free_bias_counts_once_under_checkpointing_and_uses_global_counts() -> None:
    for per_mode in run_ranks(_bias_updates, 2):
        for checkpointing, result in per_mode.items():
            assert all(s == result["tokens"] for s in result["local_sum"]), (checkpointing, result)
            assert result["bias_error"] == 0.0 and result["reset"], (checkpointing, result)
            assert len(result["names"]) == len(result["local_sum"]) > 0


def test_aux_free_bias_without_expert_parallel_across_pipeline_stages() -> None:
    # ep=1, two stages, selective AC: each stage counts its own layers once; the trainer matches
    # the one-process run that updates every router's bias from its own counts.
    cfg = tiny_config("--model.preset=deepseek_v3", "--parallel.pp=2", "--parallel.dp_shard=1",
                      "--moe.bias_update_rate=0.01", "--ac.mode=selective")
    assert_matches_reference(run_ranks(train_layout, 2, cfg), reference_run(cfg))
