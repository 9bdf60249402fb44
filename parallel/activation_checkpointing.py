"""Activation checkpointing for transformer blocks: full, selective (SAC) and per sub-module.

Selective AC follows TorchTitan: a per-op policy saves the expensive activations (attention,
every other matmul, router top-k, communication collectives) and recomputes the cheap ones.
The save set names only PyTorch's own ops, each resolved by dotted path so an op this torch
build lacks is simply absent; ops registered by other packages (the MoE dispatch and combine
ops) are handed in by the caller as `extra_save_ops`, so this module imports no one else.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections import defaultdict
from functools import partial
from typing import Any, Callable, Collection, Iterable, MutableSequence

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallel.sac_mutation_guard import guard_saved_outputs
from parallel.stable_routing import stable_topk

logger = logging.getLogger(__name__)

SELECTIVE_AC_WRAPPER_FLAG = "_harness_selective_ac"

AC_MODES = ("none", "full", "selective", "submodule")

# early_stop=False: TorchTitan saw a memory leak with EP all-to-all when recompute stops early.
_WRAPPER_KWARGS: dict[str, Any] = dict(
    checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True, early_stop=False
)

# Attention children of HF decoder layers: a KV-shared model must not recompute them (see
# `apply_submodule_checkpointing`).
_ATTENTION_CHILDREN = ("self_attn",)

# Ops saved on top of PyTorch's compute-intensive list, as `torch.ops` paths
# (<namespace>.<name>.<overload>). Each is optional: absent ones are left out.
_SAVE_TORCH_OPS = (
    "aten.mm.default",
    "aten.addmm.default",
    "aten.bmm.default",
    "aten.linear.default",
    "aten._scaled_mm.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_attention_math.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten.scaled_dot_product_attention.default",
    "aten._flash_attention_forward.default",
    "aten._efficient_attention_forward.default",
    "torch_attn._varlen_attn.default",
    # Amax for fp8 scales.
    "aten.max.default",
    "_c10d_functional.all_to_all_single.default",
    "_c10d_functional.reduce_scatter_tensor.default",
    "_c10d_functional_autograd.all_to_all_single.default",
    "_c10d_functional_autograd.reduce_scatter_tensor.default",
    # Tensor parallel's activation collectives (sequence parallel's all-gather before the
    # column-parallel projections), so that recompute issues none. FSDP2's parameter all-gathers
    # are c10d's own ops (`c10d._allgather_base_`, ignored below), never these: a rule on them
    # would keep unsharded weights alive until backward.
    "_c10d_functional.all_gather_into_tensor.default",
    "_c10d_functional.all_reduce.default",
    "_c10d_functional_autograd.all_gather_into_tensor.default",
)
# `aten.topk` is deliberately not saved, although TorchTitan saves it for routing stability:
# HF routers (Qwen3-MoE, Mixtral) normalise the top-k values in place (`/=`), and SAC rejects a
# cached tensor that was mutated ("Tensor cached during selective activation checkpoint has
# been mutated"). Instead every top-k's indices are recorded in the forward and replayed in the
# recompute (parallel/stable_routing.py), so a router decision cannot flip there.
# Higher-order ops live outside `torch.ops`; paths are relative to the `torch` module.
_SAVE_TORCH_ATTRS = (
    "_higher_order_ops.flex_attention",
    "_higher_order_ops.inductor_compiled_code",
)

# Ops that FSDP2's hooks and the profiler may run inside a checkpointed region during only one
# of forward and recompute; SAC replays saved outputs by per-op index, so they must not count.
_SAC_IGNORED_TORCH_OPS = (
    "fsdp.all_gather_copy_in.default",
    "fsdp.split_with_sizes_copy.default",
    "fsdp.chunk_cat.default",
    "fsdp.copy_.default",
    "c10d._allgather_base_.default",
    "aten.empty.memory_format",
    "aten.empty_like.default",
    "aten.view.default",
    "profiler._record_function_enter.default",
    "profiler._record_function_enter_new.default",
    "profiler._record_function_exit.default",
    "profiler._record_function_exit._RecordFunction",
)


def _resolve_op_attr(root: object, dotted_path: str) -> Any:
    """Resolve a dotted attribute path from `root`, or `None` if any part is absent.

    Used for ops that live outside `torch.ops` (higher-order ops) and for `torch.ops` paths of
    optional backends: a missing namespace or op raises AttributeError on access.
    """
    value = root
    for part in dotted_path.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            return None
    return value


def _resolve_torch_op(namespace: str, name: str, overload: str = "default") -> Any:
    """Resolve `torch.ops.<namespace>.<name>.<overload>`, or `None` if absent."""
    return _resolve_op_attr(torch.ops, f"{namespace}.{name}.{overload}")


def _existing_ops(*ops: Any) -> frozenset:
    return frozenset(op for op in ops if op is not None)


def _default_compute_intensive_ops() -> tuple:
    """Compute-intensive aten ops from PyTorch's partitioner, or `()` if unavailable.

    Seeding from PyTorch's own list keeps the save set in sync with upstream. The partitioner
    is a private API, so any failure falls back to the curated list alone.
    """
    try:
        from torch._functorch.partitioners import get_default_op_list

        packets = tuple(get_default_op_list().compute_intensive_ops)
    except Exception:  # private API: absent or changed means "no seed list"
        return ()
    # The list holds overload packets; SAC policies see concrete overloads.
    ops = []
    for packet in packets:
        for overload in getattr(packet, "overloads", lambda: ())():
            ops.append(_resolve_op_attr(packet, overload))
    return tuple(op for op in ops if op is not None)


def _resolve_op_path(path: str) -> Any:
    """Resolve "<namespace>.<name>.<overload>" under `torch.ops`, or `None` if absent."""
    return _resolve_torch_op(*path.split("."))


def _build_selective_ac_save_ops() -> frozenset:
    """Build the set of ops whose activations are always saved under selective AC.

    The set is seeded from PyTorch's compute-intensive op list and supplemented with attention
    variants, reduction ops, the compiled HOP, and communication collectives whose outputs are
    expensive (or, for collectives, unsafe) to recompute.
    """
    curated = [_resolve_op_path(path) for path in _SAVE_TORCH_OPS]
    curated += [_resolve_op_attr(torch, path) for path in _SAVE_TORCH_ATTRS]
    return _existing_ops(*_default_compute_intensive_ops(), *curated)


def resolved_optional_ops(extra_save_ops: Collection[Any] = ()) -> dict[str, bool]:
    """For each save-set op, whether it resolves in this process (start-up summary).

    `extra_save_ops`, handed in already resolved, are listed as found.
    """
    found = {f"torch.ops.{path}": _resolve_op_path(path) is not None for path in _SAVE_TORCH_OPS}
    found.update({f"torch.{path}": _resolve_op_attr(torch, path) is not None for path in _SAVE_TORCH_ATTRS})
    found.update({f"torch.ops.{op}": True for op in extra_save_ops})
    return found


_SELECTIVE_AC_MATMUL_OPS = _existing_ops(
    _resolve_torch_op("aten", "mm"),
    _resolve_torch_op("aten", "linear"),
    _resolve_torch_op("aten", "_grouped_mm"),
    _resolve_torch_op("aten", "_scaled_grouped_mm"),
)
_SELECTIVE_AC_MUST_SAVE_OPS = _build_selective_ac_save_ops()
_SELECTIVE_AC_TO_COPY_OP = _resolve_torch_op("aten", "_to_copy")
_SELECTIVE_AC_TRACE = os.environ.get("HARNESS_SELECTIVE_AC_TRACE", "0").lower() not in ("0", "", "false", "no", "off")
_SELECTIVE_AC_TRACE_SEEN: set[str] = set()


def _is_cuda_to_cpu_copy(func: Any, args: tuple, kwargs: dict) -> bool:
    # MoE split sizes are copied to the host; recomputing that copy would sync the device again.
    if func is not _SELECTIVE_AC_TO_COPY_OP or not args or not isinstance(args[0], torch.Tensor):
        return False
    target = kwargs.get("device")
    return args[0].device.type == "cuda" and target is not None and torch.device(target).type == "cpu"


def _maybe_trace_selective_ac_decision(func: Any, decision: CheckpointPolicy, is_alternating: bool,
                                       is_recompute: bool) -> None:
    """Log a selective-AC decision once per op (no-op unless tracing is enabled).

    Only forward-pass decisions are logged, so recompute does not duplicate lines.
    """
    if not _SELECTIVE_AC_TRACE or is_recompute:
        return
    name = str(func)
    if name in _SELECTIVE_AC_TRACE_SEEN:
        return
    _SELECTIVE_AC_TRACE_SEEN.add(name)
    detail = " (alternating save/recompute, first call)" if is_alternating else ""
    logger.info("selective AC: %s -> %s%s", name, decision.name, detail)


def _register_sac_ignored_ops() -> None:
    ignored = getattr(torch_checkpoint, "SAC_IGNORED_OPS", None)
    if ignored is None:
        return
    if torch.distributed.is_available():
        importlib.import_module("torch.distributed.fsdp")  # registers the torch.ops.fsdp runtime ops
    ignored.update(_existing_ops(*(_resolve_op_path(path) for path in _SAC_IGNORED_TORCH_OPS)))


def make_selective_checkpoint_context_fn(extra_save_ops: Collection[Any] = ()) -> Callable[[], tuple]:
    """Build a TorchTitan-style selective activation checkpointing context.

    Returns the `context_fn` for non-reentrant checkpointing. `extra_save_ops`: ops other
    packages register that must be saved too (e.g. `moe.ops.SAC_SAVE_OPS`). Each checkpointed
    call gets fresh matmul counters; forward and recompute keep separate counters (torch
    versions that query the policy during recompute then agree with the forward even for an
    odd matmul count).
    """
    _register_sac_ignored_ops()
    # The import-time set, and again now: torch registers some ops (e.g. varlen attention) only
    # when their module is first imported.
    save_ops = _SELECTIVE_AC_MUST_SAVE_OPS | _build_selective_ac_save_ops() | frozenset(extra_save_ops)
    matmul_ops = _SELECTIVE_AC_MATMUL_OPS

    def context_fn() -> tuple:
        matmul_counts: dict[bool, int] = defaultdict(int)

        def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
            if func in matmul_ops:
                matmul_counts[ctx.is_recompute] += 1
                save = matmul_counts[ctx.is_recompute] % 2 == 1
                decision = CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE
                _maybe_trace_selective_ac_decision(func, decision, True, ctx.is_recompute)
                return decision
            if func in save_ops or _is_cuda_to_cpu_copy(func, args, kwargs):
                decision = CheckpointPolicy.MUST_SAVE
            else:
                decision = CheckpointPolicy.PREFER_RECOMPUTE
            _maybe_trace_selective_ac_decision(func, decision, False, ctx.is_recompute)
            return decision

        contexts = create_selective_checkpoint_contexts(policy)
        # A compiled block accepts only SAC's own modes; its recompute is its graph's.
        if _tracing_for_compile():
            return contexts
        return stable_topk(guard_saved_outputs(contexts))

    return context_fn


def _tracing_for_compile() -> bool:
    """True while dynamo traces a block, and also while AOTAutograd retraces its checkpoint (torch
    2.11 on CUDA calls `context_fn` there outside dynamo, under a proxy mode, and asserts that it
    returns two TorchDispatchModes)."""
    return (torch.compiler.is_compiling()
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None)


def _disable_dynamo_lru_cache() -> None:
    """Best-effort disable of TorchDynamo's LRU cache for selective AC + compile.

    With several pipeline microbatches, dynamo may compile a dynamic-shape graph and select it
    over the static graph whose compiled-HOP output SAC cached for microbatch 0, tripping a
    missing-symint assertion; selecting graphs in insertion order avoids it. Private API.
    """
    try:
        torch._C._dynamo.eval_frame._set_lru_cache(False)
    except Exception:  # private API: when absent there is nothing to disable
        logger.debug("could not disable dynamo's LRU cache", exc_info=True)


def _replace_child_module(root: nn.Module, target: nn.Module, replacement: nn.Module) -> bool:
    """Replace `target` with `replacement` in `root`'s module tree; False if it is not there."""
    parents = [(parent, name) for parent in root.modules() for name, child in parent.named_children()
               if child is target]
    for parent, name in parents:
        setattr(parent, name, replacement)
    return bool(parents)


def _layer_slots(layers: nn.ModuleList | nn.ModuleDict | MutableSequence[nn.Module]) -> Iterable:
    return list(layers.items()) if isinstance(layers, nn.ModuleDict) else list(enumerate(layers))


def _wrap_layers(model: nn.Module, layers: nn.ModuleList | nn.ModuleDict | MutableSequence[nn.Module],
                 wrap: Callable[[nn.Module], nn.Module]) -> None:
    for key, layer in _layer_slots(layers):
        if isinstance(layer, CheckpointWrapper):
            continue
        wrapped = wrap(layer)
        if not _replace_child_module(model, layer, wrapped):
            raise ValueError(f"layer {key!r} ({type(layer).__name__}) is not a sub-module of the model")
        layers[key] = wrapped


def _wrap_selective(layer: nn.Module, context_fn: Callable[[], tuple]) -> nn.Module:
    wrapped = checkpoint_wrapper(layer, context_fn=context_fn, **_WRAPPER_KWARGS)
    setattr(wrapped, SELECTIVE_AC_WRAPPER_FLAG, True)
    return wrapped


def apply_selective_checkpointing_to_layers(model: nn.Module, layers: nn.ModuleList | nn.ModuleDict | list[nn.Module],
                                            has_kv_sharing: bool, enable_compile: bool = False,
                                            extra_save_ops: Collection[Any] = ()) -> None:
    """Wrap whole transformer blocks with the selective-AC policy (saving `extra_save_ops` too).

    KV-shared models cannot checkpoint attention through the `DynamicCache`, so they fall back
    to sub-module checkpointing. `layers` is mutated in place so callers that keep it (e.g. for
    FSDP sharding next) see the wrapped modules. Needs no process group.
    """
    if has_kv_sharing:
        logger.info("selective AC: KV-shared model, using sub-module checkpointing without self_attn")
        apply_submodule_checkpointing(layers, has_kv_sharing=True)
        return
    if enable_compile:
        _disable_dynamo_lru_cache()
    _wrap_layers(model, layers, partial(_wrap_selective, context_fn=make_selective_checkpoint_context_fn(extra_save_ops)))


def apply_submodule_checkpointing(layers: nn.ModuleList | nn.ModuleDict | list[nn.Module], has_kv_sharing: bool) -> None:
    """Wrap each child of each transformer block that holds parameters (attention, linear-attention
    and Mamba mixers, convolutions, MLPs and MoE blocks, norms) with `checkpoint_wrapper`.

    Containers (`ModuleList`, `ModuleDict`) are left alone: the block indexes them rather than
    calling them. `self_attn` is skipped for KV-shared models: recomputing attention in backward
    would write the `DynamicCache` twice, corrupting the K/V that later shared layers read.
    State-dict keys stay canonical (the wrapper's state-dict hooks strip
    `_checkpoint_wrapped_module.`).
    """
    skipped = _ATTENTION_CHILDREN if has_kv_sharing else ()
    for _, layer in _layer_slots(layers):
        if isinstance(layer, CheckpointWrapper):
            continue
        for name, child in list(layer.named_children()):
            if (name in skipped or isinstance(child, (CheckpointWrapper, nn.ModuleList, nn.ModuleDict))
                    or next(child.parameters(), None) is None):
                continue
            setattr(layer, name, checkpoint_wrapper(child, **_WRAPPER_KWARGS))


def _configs(model: nn.Module) -> list[Any]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    found = [config]
    names = ("text_config", *getattr(config, "sub_configs", {}))
    for name in dict.fromkeys(names):
        sub = getattr(config, name, None)
        if sub is not None and not isinstance(sub, (dict, str)) and sub is not config:
            found.append(sub)
    return found


def detect_kv_sharing_and_maybe_disable_cache(model: nn.Module) -> bool:
    """Detect KV sharing and set `use_cache=False` (config and sub-configs) when there is none.

    Models with KV-shared layers (e.g. Gemma3n) pass K/V from earlier layers to later ones
    through the `DynamicCache`, so their cache stays on. Every other model must run without it:
    the cache makes recompute diverge from the forward under checkpointing.
    """
    configs = _configs(model)
    shared = any((getattr(config, "num_kv_shared_layers", 0) or 0) > 0 for config in configs)
    if not shared:
        for config in configs:
            if hasattr(config, "use_cache"):
                try:
                    config.use_cache = False
                except (AttributeError, TypeError, ValueError):
                    # A config that refuses the assignment keeps its flag: the harness's own forwards
                    # pass use_cache=False.
                    pass
    return shared


def is_selective_activation_checkpointing(activation_checkpointing: object) -> bool:
    """True only for the string "selective" (case- and surrounding-space-insensitive)."""
    return isinstance(activation_checkpointing, str) and activation_checkpointing.strip().lower() == "selective"


def apply_activation_checkpointing(model: nn.Module, layers: nn.ModuleList | nn.ModuleDict | list[nn.Module],
                                   mode: str, extra_save_ops: Collection[Any] = (), enable_compile: bool = False) -> None:
    """Apply one AC mode (none | full | selective | submodule) to `layers` of `model`, in place.

    `extra_save_ops`: ops registered outside torch that selective AC saves too; `enable_compile`:
    the blocks will be compiled next.

    Call before FSDP. KV-shared models get sub-module checkpointing without `self_attn` for
    every mode other than "none", since recomputing a whole block writes their cache twice.
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpointing={mode!r}: expected one of {', '.join(AC_MODES)}")
    if mode == "none":
        return
    has_kv_sharing = detect_kv_sharing_and_maybe_disable_cache(model)
    if mode == "selective":
        apply_selective_checkpointing_to_layers(model, layers, has_kv_sharing, enable_compile=enable_compile,
                                                extra_save_ops=extra_save_ops)
    elif mode == "submodule" or has_kv_sharing:
        apply_submodule_checkpointing(layers, has_kv_sharing)
    else:
        _wrap_layers(model, layers, partial(checkpoint_wrapper, **_WRAPPER_KWARGS))
