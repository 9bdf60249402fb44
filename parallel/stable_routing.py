"""Top-k decisions that recompute cannot change.

An MoE router picks experts with `topk` over its scores. Under activation checkpointing the
router runs again in the backward pass, and a router matmul that is not bitwise reproducible
(split-K GEMMs, atomics, another kernel chosen under memory pressure) can move a score across the
k-th boundary: the recompute then routes a token to other experts than the forward did, and its
gradients belong to a computation that never ran. Saving the top-k output through the selective
policy is not enough on its own: HF routers normalise the top-k values in place.

So the forward records each `topk`'s indices, and the recompute replays them: it still runs
`topk` (the checkpoint's own modes see the same op sequence), then returns the recorded indices
and the recomputed scores gathered at them. With identical scores that is bitwise the forward's
output; with perturbed ones the decision stays and only the weights follow the scores.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_TOPK = torch.ops.aten.topk.default


def _topk_dim(args: tuple, kwargs: dict) -> int:
    return args[2] if len(args) > 2 else kwargs.get("dim", -1)


class _TopKDecisions(TorchDispatchMode):
    """Records each `topk`'s indices (forward) or replays them, gathering the recomputed scores at
    the recorded indices (recompute)."""

    def __init__(self, decisions: list[torch.Tensor], replay: bool) -> None:
        super().__init__()
        self.decisions, self.replay = decisions, replay

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not _TOPK:
            return out
        # Hidden from the modes below: a selective-checkpoint mode matches forward and recompute
        # by their op order, and neither the copy nor the gather is an op of the region.
        with _disable_current_modes():
            if not self.replay:
                self.decisions.append(out[1].clone())
                return out
            indices = self.decisions.pop(0)
            return args[0].gather(_topk_dim(args, kwargs), indices), indices.clone()


class _Stacked:
    """`outer` entered first, then `inner` (which sees each op first); reads through to `outer`
    (a selective-checkpoint caching mode's `policy_fn` and `storage`)."""

    def __init__(self, outer: Any, inner: TorchDispatchMode) -> None:
        self.outer, self.inner = outer, inner
        self._stack = ExitStack()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.outer, name)

    def __enter__(self) -> _Stacked:
        self._stack.enter_context(self.outer)
        self._stack.enter_context(self.inner)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def stable_topk(contexts: tuple[Any, Any]) -> tuple[Any, Any]:
    """A checkpoint's (forward, recompute) contexts with the forward's top-k decisions replayed in
    the recompute. Not for compiled blocks: dynamo traces only the selective-checkpoint modes."""
    forward, recompute = contexts
    decisions: list[torch.Tensor] = []
    return (_Stacked(forward, _TopKDecisions(decisions, replay=False)),
            _Stacked(recompute, _TopKDecisions(decisions, replay=True)))
