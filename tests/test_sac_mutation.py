"""Selective AC with in-place ops on saved outputs (HF's `out.add_(bias)` after a saved matmul):
gradients bitwise those without checkpointing, on a bare block and on a one-process GPT-OSS."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from harness.loss import token_loss_sum
from harness.model_parts import decoder_layers
from harness.models import reference_model
from parallel.activation_checkpointing import (apply_selective_checkpointing_to_layers,
                                                make_selective_checkpoint_context_fn)
from tests.moe_common import SEED, batch, gpt_oss_config


def _block(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out = x @ w  # the first matmul of the region: saved
    out.add_(bias)  # mutates the saved output, as transformers' grouped experts do
    out = out * 3.0
    out.mul_(2.0)  # an in-place op on an output that was not saved
    return (out.tanh() @ w.t()).square().sum()


def _grads(context_fn) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x, w, bias = (torch.randn(shape, generator=generator, requires_grad=True) for shape in ((8, 6), (6, 6), (6,)))
    if context_fn is None:
        loss = _block(x, w, bias)
    else:
        loss = checkpoint(_block, x, w, bias, use_reentrant=False, context_fn=context_fn)
    loss.backward()
    return [x.grad, w.grad, bias.grad]


def test_in_place_op_on_saved_output_keeps_grads_bitwise() -> None:
    plain = _grads(None)
    selective = _grads(make_selective_checkpoint_context_fn())
    assert all(torch.equal(a, b) for a, b in zip(plain, selective))


def test_unguarded_policy_fails_on_the_same_block() -> None:
    # The control: torch's own caching of the same policy refuses the mutated entry.
    caching_mode, _ = make_selective_checkpoint_context_fn()()
    with pytest.raises(RuntimeError, match="mutated"):
        _grads(lambda: create_selective_checkpoint_contexts(caching_mode.policy_fn))


def _gpt_oss_grads(selective: bool) -> dict[str, torch.Tensor]:
    config = gpt_oss_config()
    model = reference_model(config, SEED)
    if selective:
        apply_selective_checkpointing_to_layers(model, decoder_layers(model), has_kv_sharing=False)
    inputs, labels = batch(config.vocab_size)
    (token_loss_sum(model(inputs).logits, labels) / labels.numel()).backward()
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}


def test_gpt_oss_selective_ac_one_process_bitwise() -> None:
    plain, selective = _gpt_oss_grads(False), _gpt_oss_grads(True)
    assert plain.keys() == selective.keys()
    assert all(torch.equal(plain[n], selective[n]) for n in plain), [n for n in plain
                                                                     if not torch.equal(plain[n], selective[n])]
