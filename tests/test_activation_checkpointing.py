"""Selective-AC policy, save set, wrapping, KV sharing and tracing (single process)."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext
from transformers import Gemma3nForCausalLM, Gemma3nTextConfig, LlamaForCausalLM

import parallel.activation_checkpointing as ac
from harness.model_parts import decoder_layers
from harness.models import load_config, reference_model
from tests.ac_helpers import OpRecorder, StackModel, assert_bitwise, inner, lm_loss_and_grads

MM = "aten.mm.default"
SDPA = "aten._scaled_dot_product_flash_attention_for_cpu.default"
ELEMENTWISE = ("aten.mul.Tensor", "aten.silu.default", "aten.rsqrt.default", "aten.pow.Tensor_Scalar")


def _policy(extra_save_ops=()):
    caching_mode, _ = ac.make_selective_checkpoint_context_fn(extra_save_ops)()
    return caching_mode.policy_fn


def _trace_first_block(mode: str) -> OpRecorder:
    model = reference_model(load_config("llama", None), seed=0)
    layers = decoder_layers(model)
    ac.apply_activation_checkpointing(model, layers, mode)
    recorder = OpRecorder()
    recorder.watch(inner(layers[0]))
    input_ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with recorder:
        lm_loss_and_grads(model, input_ids)
    return recorder


def test_selective_policy_trace_on_llama_block() -> None:
    counts = _trace_first_block("selective")
    forward, recompute = counts.counts["forward"], counts.counts["recompute"]
    assert forward[MM] == 7  # q, k, v, o, gate, up, down
    assert recompute[MM] == 3  # the 2nd, 4th and 6th are recomputed; 1st, 3rd, 5th, 7th saved
    assert forward[SDPA] == 1 and recompute[SDPA] == 0
    for op in ELEMENTWISE:
        assert forward[op] > 0 and recompute[op] == forward[op], op


def test_full_checkpointing_recomputes_everything() -> None:
    counts = _trace_first_block("full")
    assert counts.counts["recompute"][MM] == 7
    assert counts.counts["recompute"][SDPA] == 1


@pytest.mark.parametrize("depth, recomputed", [(3, 1), (4, 2)])
def test_matmuls_alternate_within_each_region(depth: int, recomputed: int) -> None:
    model = StackModel(width=8, depth=depth, blocks=2)
    ac.apply_activation_checkpointing(model, model.layers, "selective")
    recorder = OpRecorder()
    recorder.watch(inner(model.layers[1]))
    with recorder:
        model(torch.randn(4, 8)).sum().backward()
    # Counters restart in every checkpointed call: block 1 alternates like block 0.
    assert recorder.counts["forward"][MM] == depth
    assert recorder.counts["recompute"][MM] == recomputed
    assert recorder.counts["recompute"]["aten.relu.default"] == depth


def test_policy_keeps_separate_counters_for_recompute() -> None:
    policy = _policy()
    mm = torch.ops.aten.mm.default
    forward, recompute = SelectiveCheckpointContext(is_recompute=False), SelectiveCheckpointContext(is_recompute=True)
    # Three matmuls (odd), with the recompute pass interleaved: both passes see save/recompute/save.
    decisions = {False: [], True: []}
    for ctx in (forward, recompute, forward, forward, recompute, recompute):
        decisions[ctx.is_recompute].append(policy(ctx, mm))
    expected = [CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_SAVE]
    assert decisions[False] == expected and decisions[True] == expected


def test_policy_decisions_by_op_kind() -> None:
    policy = _policy()
    ctx = SelectiveCheckpointContext(is_recompute=False)
    x = torch.ones(2)
    assert policy(ctx, torch.ops.aten.addmm.default) is CheckpointPolicy.MUST_SAVE
    assert policy(ctx, torch.ops.aten.bmm.default) is CheckpointPolicy.MUST_SAVE
    assert policy(ctx, torch.ops._c10d_functional.all_to_all_single.default) is CheckpointPolicy.MUST_SAVE
    assert policy(ctx, torch.ops._c10d_functional.reduce_scatter_tensor.default) is CheckpointPolicy.MUST_SAVE
    assert policy(ctx, torch.ops.aten.mul.Tensor, x, x) is CheckpointPolicy.PREFER_RECOMPUTE
    # A host copy that does not leave a GPU is cheap: recomputed.
    copy = torch.ops.aten._to_copy.default
    assert policy(ctx, copy, x, device=torch.device("cpu")) is CheckpointPolicy.PREFER_RECOMPUTE


def test_cuda_to_cpu_copy_detection() -> None:
    copy = torch.ops.aten._to_copy.default
    # A fake tensor carries a CUDA device without needing a GPU.
    with FakeTensorMode():
        on_gpu = torch.empty(2, device="cuda")
    cpu = torch.device("cpu")
    assert ac._is_cuda_to_cpu_copy(copy, (on_gpu,), {"device": cpu})
    assert ac._is_cuda_to_cpu_copy(copy, (on_gpu,), {"device": "cpu"})
    assert not ac._is_cuda_to_cpu_copy(copy, (on_gpu,), {"dtype": torch.float16})
    assert not ac._is_cuda_to_cpu_copy(copy, (torch.empty(2),), {"device": cpu})
    assert not ac._is_cuda_to_cpu_copy(torch.ops.aten.mul.Tensor, (on_gpu,), {"device": cpu})
    assert _policy()(SelectiveCheckpointContext(is_recompute=False), copy, on_gpu, device=cpu) is CheckpointPolicy.MUST_SAVE


def test_policy_saves_what_the_module_save_set_names(monkeypatch) -> None:
    mul = torch.ops.aten.mul.Tensor
    context = SelectiveCheckpointContext(is_recompute=False)
    assert _policy()(context, mul) is CheckpointPolicy.PREFER_RECOMPUTE
    monkeypatch.setattr(ac, "_SELECTIVE_AC_MUST_SAVE_OPS", ac._SELECTIVE_AC_MUST_SAVE_OPS | {mul})
    assert _policy()(context, mul) is CheckpointPolicy.MUST_SAVE


def test_save_set_contents_and_report() -> None:
    save = ac._build_selective_ac_save_ops()
    for op in (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
               torch.ops.aten._scaled_dot_product_efficient_attention.default,
               torch.ops.aten.addmm.default, torch.ops.aten.max.default,
               torch.ops._c10d_functional.all_to_all_single.default,
               torch._higher_order_ops.flex_attention):
        assert op in save, op
    assert torch.ops.aten.mul.Tensor not in save
    assert ac._SELECTIVE_AC_MUST_SAVE_OPS <= save  # the module's import-time set
    report = ac.resolved_optional_ops()
    assert report["torch.ops.aten.addmm.default"] is True
    # The module names only torch's own ops: other packages' ops reach it from the caller.
    assert not any(name.split(".")[2] in ("harness", "deepep", "hybridep") for name in report if name.startswith("torch.ops."))


def test_caller_ops_are_saved_and_reported() -> None:
    # Like `moe.ops.SAC_SAVE_OPS`, handed in by harness/parallelize.py. A namespace of its own,
    # so no other test's registration can interfere.
    lib = torch.library.Library("harness_sac_test", "FRAGMENT")
    lib.define("dispatch(Tensor x) -> Tensor")
    lib.impl("dispatch", lambda x: x * 2, "CompositeExplicitAutograd")
    op = torch.ops.harness_sac_test.dispatch.default
    forward = SelectiveCheckpointContext(is_recompute=False)
    assert _policy()(forward, op) is CheckpointPolicy.PREFER_RECOMPUTE
    assert _policy([op])(forward, op) is CheckpointPolicy.MUST_SAVE
    assert "torch.ops.harness_sac_test.dispatch.default" not in ac.resolved_optional_ops()
    assert ac.resolved_optional_ops([op])["torch.ops.harness_sac_test.dispatch.default"] is True


def test_missing_namespaces_degrade(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops, "_c10d_functional", object())
    monkeypatch.delattr(torch._higher_order_ops, "flex_attention")
    import torch._functorch.partitioners as partitioners

    def unavailable():
        raise RuntimeError("partitioner API changed")

    monkeypatch.setattr(partitioners, "get_default_op_list", unavailable)
    assert ac._default_compute_intensive_ops() == ()
    assert ac._resolve_torch_op("_c10d_functional", "all_to_all_single") is None
    assert ac._resolve_op_attr(torch, "_higher_order_ops.flex_attention") is None
    save = ac._build_selective_ac_save_ops()
    assert torch.ops.aten.mm.default in save and torch.ops.aten.addmm.default in save
    assert not any(str(op).startswith("_c10d_functional.") or "flex_attention" in str(op) for op in save)
    assert ac.resolved_optional_ops()["torch.ops._c10d_functional.all_to_all_single.default"] is False
    # The policy still builds and runs.
    model = StackModel(width=8, depth=2)
    ac.apply_activation_checkpointing(model, model.layers, "selective")
    model(torch.randn(2, 8)).sum().backward()


def test_sac_ignored_ops_registered_once() -> None:
    ac.make_selective_checkpoint_context_fn()
    ignored = torch.utils.checkpoint.SAC_IGNORED_OPS
    size = len(ignored)
    ac.make_selective_checkpoint_context_fn()
    assert len(ignored) == size
    for op in (torch.ops.fsdp.all_gather_copy_in.default, torch.ops.fsdp.split_with_sizes_copy.default,
               torch.ops.c10d._allgather_base_.default, torch.ops.profiler._record_function_enter_new.default):
        assert op in ignored


def test_layers_replaced_in_model_and_container() -> None:
    model = StackModel(width=8, depth=1, blocks=3)
    plain = list(model.layers)
    ac.apply_selective_checkpointing_to_layers(model, plain, has_kv_sharing=False)
    assert all(isinstance(layer, CheckpointWrapper) for layer in plain)
    assert all(a is b for a, b in zip(plain, model.layers))
    assert all(getattr(layer, ac.SELECTIVE_AC_WRAPPER_FLAG) for layer in plain)
    # Applying again leaves wrapped layers alone (no nested wrappers).
    ac.apply_selective_checkpointing_to_layers(model, model.layers, has_kv_sharing=False)
    assert all(not isinstance(inner(layer), CheckpointWrapper) for layer in model.layers)


def test_module_dict_layers() -> None:
    model = nn.Module()
    model.layers = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    ac.apply_selective_checkpointing_to_layers(model, model.layers, has_kv_sharing=False)
    assert set(model.layers) == {"a", "b"}
    assert all(isinstance(layer, CheckpointWrapper) for layer in model.layers.values())
    assert set(model.state_dict()) == {"layers.a.weight", "layers.a.bias", "layers.b.weight", "layers.b.bias"}


def test_foreign_layers_rejected() -> None:
    model = StackModel(width=4, depth=1)
    with pytest.raises(ValueError, match="not a sub-module"):
        ac.apply_selective_checkpointing_to_layers(model, [nn.Linear(4, 4)], has_kv_sharing=False)


def test_submodule_checkpointing_state_dict_is_canonical() -> None:
    model = reference_model(load_config("llama", None), seed=0)
    keys = set(model.state_dict())
    layers = decoder_layers(model)
    ac.apply_submodule_checkpointing(layers, has_kv_sharing=False)
    wrapped = [name for name, child in layers[0].named_children() if isinstance(child, CheckpointWrapper)]
    assert sorted(wrapped) == ["input_layernorm", "mlp", "post_attention_layernorm", "self_attn"]
    assert any("_checkpoint_wrapped_module" in name for name, _ in model.named_modules())
    assert set(model.state_dict()) == keys
    ac.apply_submodule_checkpointing(layers, has_kv_sharing=False)  # already wrapped: untouched
    assert not isinstance(inner(layers[0].mlp), CheckpointWrapper)


def test_mode_validation_and_flag() -> None:
    model = StackModel(width=4, depth=1)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        ac.apply_activation_checkpointing(model, model.layers, "sometimes")
    ac.apply_activation_checkpointing(model, model.layers, "none")
    assert not any(isinstance(m, CheckpointWrapper) for m in model.modules())
    assert ac.is_selective_activation_checkpointing(" Selective ")
    assert not ac.is_selective_activation_checkpointing("full")
    assert not ac.is_selective_activation_checkpointing(True)


def _tiny_gemma3n() -> Gemma3nForCausalLM:
    config = Gemma3nTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, vocab_size_per_layer_input=256,
        hidden_size_per_layer_input=8, num_kv_shared_layers=2, laurel_rank=4,
        activation_sparsity_pattern=[0.0] * 4, layer_types=["sliding_attention", "full_attention"] * 2,
        altup_num_inputs=2, sliding_window=16)
    torch.manual_seed(0)
    return Gemma3nForCausalLM(config)


@pytest.mark.parametrize("mode", ["selective", "full", "submodule"])
def test_kv_shared_model_keeps_cache_and_skips_attention(mode: str) -> None:
    reference, model = _tiny_gemma3n(), _tiny_gemma3n()
    layers = decoder_layers(model)
    ac.apply_activation_checkpointing(model, layers, mode)
    assert model.config.use_cache is True
    for layer in layers:
        assert not isinstance(layer, CheckpointWrapper)
        assert not isinstance(layer.self_attn, CheckpointWrapper)
        assert isinstance(layer.mlp, CheckpointWrapper) and isinstance(layer.input_layernorm, CheckpointWrapper)
    input_ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
    expected_loss, expected = lm_loss_and_grads(reference, input_ids)
    loss, grads = lm_loss_and_grads(model, input_ids)
    assert torch.equal(expected_loss, loss)
    assert_bitwise(expected, grads)


def test_kv_sharing_detected_on_text_config() -> None:
    holder = nn.Module()
    holder.config = _tiny_gemma3n().config
    holder.config.use_cache = True
    wrapper = nn.Module()
    wrapper.config = type("Multimodal", (), {"text_config": holder.config, "use_cache": True})()
    assert ac.detect_kv_sharing_and_maybe_disable_cache(wrapper) is True
    assert wrapper.config.use_cache is True and holder.config.use_cache is True


def test_cache_disabled_without_kv_sharing_including_sub_configs() -> None:
    from transformers import AutoConfig

    llama = reference_model(load_config("llama", None), seed=0)
    llama.config.use_cache = True
    assert ac.detect_kv_sharing_and_maybe_disable_cache(llama) is False
    assert llama.config.use_cache is False

    holder = nn.Module()
    holder.config = AutoConfig.for_model("gemma3n")
    holder.config.text_config.num_kv_shared_layers = 0
    holder.config.use_cache = holder.config.text_config.use_cache = True
    assert ac.detect_kv_sharing_and_maybe_disable_cache(holder) is False
    assert holder.config.use_cache is False and holder.config.text_config.use_cache is False
    assert ac.detect_kv_sharing_and_maybe_disable_cache(nn.Linear(2, 2)) is False


@pytest.fixture
def traced_module(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HARNESS_SELECTIVE_AC_TRACE", "1")
    importlib.reload(ac)
    yield ac
    monkeypatch.delenv("HARNESS_SELECTIVE_AC_TRACE")
    importlib.reload(ac)


def test_trace_logs_each_op_once_in_forward_only(traced_module, caplog: pytest.LogCaptureFixture) -> None:
    assert traced_module._SELECTIVE_AC_TRACE is True
    model = StackModel(width=8, depth=3, blocks=2)
    traced_module.apply_activation_checkpointing(model, model.layers, "selective")
    caplog.set_level(logging.INFO, logger=traced_module.logger.name)
    out = model(torch.randn(2, 8)).sum()
    forward_lines = [r.getMessage() for r in caplog.records]
    out.backward()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == forward_lines  # nothing logged by the recompute pass
    ops = [line.split(" -> ")[0] for line in lines]
    assert len(ops) == len(set(ops))  # one line per op despite 6 matmuls and 2 blocks
    assert "selective AC: aten.mm.default -> MUST_SAVE (alternating save/recompute, first call)" in lines
    assert "selective AC: aten.relu.default -> PREFER_RECOMPUTE" in lines


def test_trace_off_by_default(caplog: pytest.LogCaptureFixture) -> None:
    assert ac._SELECTIVE_AC_TRACE is False
    caplog.set_level(logging.INFO, logger=ac.logger.name)
    model = StackModel(width=8, depth=2)
    ac.apply_activation_checkpointing(model, model.layers, "selective")
    model(torch.randn(2, 8)).sum().backward()
    assert not caplog.records


def test_config_that_refuses_assignment_does_not_crash_ac() -> None:
    """A config whose `use_cache` cannot be set keeps it; with use_cache=False passed to the
    forward (as the trainer does), full AC stays bitwise equal to none."""
    base = load_config("llama", None)

    class LockedCache(type(base)):
        def __setattr__(self, key, value):
            if key == "use_cache" and getattr(self, "_locked", False):
                raise AttributeError("use_cache is read-only")
            super().__setattr__(key, value)

    config = LockedCache(**{**base.to_dict(), "use_cache": True})
    object.__setattr__(config, "_locked", True)
    reference = reference_model(base, seed=0)
    model = LlamaForCausalLM(config)
    model.load_state_dict(reference.state_dict())
    ac.apply_activation_checkpointing(model, decoder_layers(model), "full")
    assert config.use_cache
    input_ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for m in (reference, model):
        loss = m(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in m.parameters()])
    assert torch.equal(*losses)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
