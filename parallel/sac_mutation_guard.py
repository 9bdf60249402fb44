"""Selective AC that survives in-place ops on the outputs it saved.

Selective AC keeps the saved op's output itself, so code that later mutates that output in
place (HF's grouped-experts forward adds the expert bias with `out.add_(bias)` to a saved
`_grouped_mm` output; GPT-OSS) leaves a changed cache entry behind, and the backward stops with
"Tensor cached during selective activation checkpoint has been mutated" (on torch versions that
allowed it instead, recompute would have added the bias twice). The guard, a dispatch mode over
the forward's caching mode, sees each mutating op before it runs: when its target shares storage
with a cached output, the cache entry is replaced by a copy taken just then, so recompute gets the
value the saved op produced and the forward's tensor is mutated as the model expects. Only outputs
that are actually mutated are copied; the gradients stay bitwise those without checkpointing.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes


_WRITTEN_ARGUMENTS: dict[Any, tuple[tuple[int, str], ...]] = {}


def _written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments `func` writes to; looked up once per op."""
    written = _WRITTEN_ARGUMENTS.get(func)
    if written is None:
        schema = func._schema
        written = tuple((i, a.name) for i, a in enumerate(schema.arguments)
                        if schema.is_mutable and a.alias_info is not None and a.alias_info.is_write)
        _WRITTEN_ARGUMENTS[func] = written
    return written


def _mutated_args(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    mutated = []
    for index, name in _written_arguments(func):
        value = args[index] if index < len(args) else kwargs.get(name)
        values = value if isinstance(value, (list, tuple)) else [value]
        mutated.extend(v for v in values if isinstance(v, torch.Tensor))
    return mutated


def _cache_entries(storage: Any) -> Iterator[Any]:
    """Every cached value of the caching mode's storage: {op: {index: entry}} on recent torch,
    {op: [entry, ...]} on older ones; an entry is a version wrapper or a tuple of them."""
    for per_op in storage.values():
        for entry in (per_op.values() if isinstance(per_op, dict) else per_op):
            yield from (entry if isinstance(entry, (list, tuple)) else [entry])


class _CopyOnMutate(TorchDispatchMode):
    def __init__(self, storage: Any) -> None:
        super().__init__()
        self.storage = storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _written_arguments(func) or not self.storage:
            return func(*args, **kwargs)
        # Storage identity, not data_ptr: meta and fake tensors all report address 0.
        targets = {t.untyped_storage()._cdata for t in _mutated_args(func, args, kwargs)}
        if targets:
            self._copy_cached(targets)
        return func(*args, **kwargs)

    def _copy_cached(self, targets: set[int]) -> None:
        for wrapper in _cache_entries(self.storage):
            value = getattr(wrapper, "val", None)
            if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata in targets:
                # Hidden from the modes below: the caching mode must not count the copy as an op
                # of the region, or forward and recompute would disagree on op order.
                with _disable_current_modes():
                    wrapper.val = value.clone()
                wrapper.version = wrapper.val._version


class _GuardedForward:
    """The forward's caching mode with the guard above it; reads through to the caching mode
    (its `policy_fn`, `storage`)."""

    def __init__(self, caching_mode: Any) -> None:
        self.caching_mode = caching_mode
        self._stack = ExitStack()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.caching_mode, name)

    def __enter__(self) -> _GuardedForward:
        self._stack.enter_context(self.caching_mode)
        self._stack.enter_context(_CopyOnMutate(self.caching_mode.storage))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def guard_saved_outputs(contexts: tuple[Any, Any]) -> tuple[Any, Any]:
    """`create_selective_checkpoint_contexts(...)`'s (forward, recompute) contexts, with the
    forward's cache entries copied before an in-place op changes them. A caching mode without a
    `storage` (a torch version that keeps it elsewhere) is returned unguarded."""
    forward, recompute = contexts
    if not hasattr(forward, "storage"):
        return contexts
    return _GuardedForward(forward), recompute
