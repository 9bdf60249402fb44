"""Router decisions survive a recompute that computes different router scores.

The gate's input is negated during the recompute only (a stand-in for a router matmul that is
not bitwise reproducible, pushed to the extreme: every token's ranking of experts reverses).
Under selective AC the experts must still receive the forward's top-k indices; under a plain
checkpoint with the same perturbation they do not, which shows the perturbation reaches the
router.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from harness.loss import token_loss_sum
from harness.model_parts import decoder_layers, moe_blocks
from harness.models import load_config, reference_model
from moe.balance import is_recomputing
from parallel.activation_checkpointing import apply_activation_checkpointing
from tests.ac_helpers import assert_bitwise, lm_loss_and_grads


def _model(seed: int = 0) -> torch.nn.Module:
    return reference_model(load_config("qwen3_moe", None), seed)


def _routing_seen(model: torch.nn.Module, input_ids: torch.Tensor, perturb: bool) -> dict[str, list[torch.Tensor]]:
    """One forward and backward; the top-k indices each MoE block's experts got, by phase."""
    seen: dict[str, list[torch.Tensor]] = {"forward": [], "recompute": []}
    for block in moe_blocks(model):
        block.experts.register_forward_pre_hook(
            lambda _, args: seen["recompute" if is_recomputing() else "forward"].append(args[1].clone()))
        if perturb:
            # The same op in both phases (checkpointing matches them by op order), negating only in recompute.
            block.router.register_forward_pre_hook(lambda _, args: (args[0] * (-1.0 if is_recomputing() else 1.0),))
    loss = token_loss_sum(model(input_ids=input_ids[:, :-1]).logits, input_ids[:, 1:])
    loss.backward()
    return seen


def _input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 33), generator=torch.Generator().manual_seed(0))


def test_selective_ac_replays_router_decisions_under_perturbed_recompute():
    model = _model()
    apply_activation_checkpointing(model, decoder_layers(model), "selective")
    seen = _routing_seen(model, _input_ids(model.config.vocab_size), perturb=True)
    assert len(seen["forward"]) == len(seen["recompute"]) == len(moe_blocks(model)) > 0
    for forward, recompute in zip(seen["forward"], reversed(seen["recompute"])):
        assert torch.equal(forward, recompute)


def test_without_the_replay_the_perturbation_flips_decisions():
    def recompute_all(ctx, func, *args, **kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE

    model = _model()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, context_fn=partial(create_selective_checkpoint_contexts, recompute_all),
                                       preserve_rng_state=True)
    seen = _routing_seen(model, _input_ids(model.config.vocab_size), perturb=True)
    assert any(not torch.equal(f, r) for f, r in zip(seen["forward"], reversed(seen["recompute"])))


def test_replay_keeps_gradients_bitwise_equal_to_no_checkpointing():
    input_ids = _input_ids(_model().config.vocab_size)
    plain = _model()
    selective = _model()
    apply_activation_checkpointing(selective, decoder_layers(selective), "selective")
    plain_loss, plain_grads = lm_loss_and_grads(plain, input_ids)
    loss, grads = lm_loss_and_grads(selective, input_ids)
    assert torch.equal(plain_loss, loss)
    assert_bitwise(plain_grads, grads)
