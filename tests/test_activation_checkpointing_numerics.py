"""Every AC mode reproduces the no-AC loss and gradients bitwise, and really recomputes."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from harness.materialize import canonical_name
from harness.model_parts import decoder_layers
from harness.models import load_config, reference_model
from parallel.activation_checkpointing import SELECTIVE_AC_WRAPPER_FLAG, apply_activation_checkpointing
from tests.ac_helpers import StackModel, assert_bitwise, inner, lm_loss_and_grads

MODES = ("full", "selective", "submodule")


def _count_forward_calls(modules) -> list[int]:
    calls = [0] * len(modules)
    for i, module in enumerate(modules):
        module.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("depth", [3, 4])
def test_linear_relu_stack_bitwise(mode: str, depth: int) -> None:
    torch.manual_seed(0)
    reference = StackModel(width=16, depth=depth)
    model = StackModel(width=16, depth=depth)
    model.load_state_dict(reference.state_dict())
    apply_activation_checkpointing(model, model.layers, mode)
    x = torch.randn(8, 16)
    # The checkpointed part (block or its `mlp`) must run twice: forward and recompute.
    checkpointed = [inner(layer).mlp if mode == "submodule" else layer for layer in model.layers]
    calls = _count_forward_calls([inner(m) for m in checkpointed])

    grads = {}
    for name, net in (("none", reference), (mode, model)):
        loss = net(x).square().sum()
        loss.backward()
        grads[name] = (loss.detach(), {canonical_name(n): p.grad for n, p in net.named_parameters()})
    assert calls == [2] * len(calls)

    assert torch.equal(grads["none"][0], grads[mode][0])
    assert_bitwise(grads["none"][1], grads[mode][1])


def _hf_case(preset: str, mode: str) -> None:
    config = load_config(preset, None)
    reference = reference_model(config, seed=0)
    model = reference_model(config, seed=0)
    layers = decoder_layers(model)
    apply_activation_checkpointing(model, layers, mode)
    if mode == "submodule":
        assert all(isinstance(layer.self_attn, CheckpointWrapper) and isinstance(layer.mlp, CheckpointWrapper)
                   for layer in layers)
    else:
        assert all(isinstance(layer, CheckpointWrapper) for layer in layers)
        assert all(getattr(layer, SELECTIVE_AC_WRAPPER_FLAG, False) == (mode == "selective") for layer in layers)
    _assert_bitwise_step(reference, model, seq_len=33)


def _assert_bitwise_step(reference: torch.nn.Module, model: torch.nn.Module, seq_len: int) -> None:
    """Wrapping left the state-dict keys canonical, and one training step's loss and gradients
    are bitwise those of the unwrapped model."""
    assert model.state_dict().keys() == reference.state_dict().keys()
    input_ids = torch.randint(0, reference.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    expected_loss, expected = lm_loss_and_grads(reference, input_ids)
    loss, grads = lm_loss_and_grads(model, input_ids)
    assert torch.equal(expected_loss, loss)
    assert_bitwise(expected, grads)


@pytest.mark.parametrize("mode", MODES)
def test_llama_bitwise(mode: str) -> None:
    _hf_case("llama", mode)


@pytest.mark.parametrize("mode", MODES)
def test_qwen3_moe_bitwise(mode: str) -> None:
    _hf_case("qwen3_moe", mode)


def test_ac_report_measures_every_mode(tmp_path) -> None:
    import json

    from tests.bench import ac_report

    out = tmp_path / "ac.json"
    ac_report.main(["--hidden", "64", "--layers", "2", "--seq", "64", "--batch", "2", "--steps", "1", "--out", str(out)])
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["none", "full", "selective", "submodule"]
    assert len({row["loss"] for row in rows.values()}) == 1
    # Checkpointing must show up in the tensor-level measurement: full < selective < none.
    assert rows["full"]["activation_mib"] < rows["selective"]["activation_mib"] < rows["none"]["activation_mib"]


# Hybrid blocks: the mixer each family's layers hold besides (or instead of) attention.
_MIXERS = {"qwen3_next": "linear_attn", "nemotron_h": "mixer", "lfm2": "conv", "granitemoehybrid": "mamba",
           "jamba": "mamba", "falcon_h1": "mamba"}


@pytest.mark.parametrize("family", sorted(_MIXERS))
def test_submodule_ac_wraps_hybrid_mixers_bitwise(family: str) -> None:
    """Sub-module AC checkpoints every child of a block that holds parameters, so linear-attention,
    Mamba and convolution mixers are recomputed too, and the result stays bitwise."""
    from tests.families import HAND_SHRUNK, hand_shrunk_config, tiny_config as family_config

    config = hand_shrunk_config(family) if family in HAND_SHRUNK else family_config(family)
    reference, model = reference_model(config, seed=0), reference_model(config, seed=0)
    apply_activation_checkpointing(model, decoder_layers(model), "submodule")
    wrapped = [getattr(layer, _MIXERS[family], None) for layer in decoder_layers(model)]
    assert any(isinstance(child, CheckpointWrapper) for child in wrapped), f"{family}: no {_MIXERS[family]} wrapped"
    _assert_bitwise_step(reference, model, seq_len=17)
