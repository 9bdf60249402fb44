"""Shared pieces of the activation-checkpointing tests: toy stacks, an op recorder, grad capture."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from harness.loss import token_loss_sum
from harness.materialize import canonical_name


class LinearReluStack(nn.Module):
    """`depth` bias-free Linear+ReLU pairs: bias-free so every matmul is an `aten.mm`."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width, bias=False), nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class StackModel(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3, blocks: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LinearReluStack(width, depth) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class OpRecorder(TorchDispatchMode):
    """Counts aten ops per phase: "forward" and "recompute" while a watched block's forward runs
    outside / inside backward, "other" elsewhere. Under SAC, saved ops are replayed from the
    cache during recompute and never reach this mode."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "other"
        self.counts: dict[str, Counter] = {"forward": Counter(), "recompute": Counter(), "other": Counter()}

    def watch(self, block: nn.Module) -> None:
        """Attribute ops run inside `block`'s forward to "forward" or "recompute"."""
        def enter(*_: object) -> None:
            self._outer = self.phase
            self.phase = "recompute" if torch._C._current_graph_task_id() != -1 else "forward"

        def leave(*_: object) -> None:
            self.phase = self._outer

        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.phase][str(func)] += 1
        return func(*args, **(kwargs or {}))


def inner(module: nn.Module) -> nn.Module:
    return getattr(module, "_checkpoint_wrapped_module", module)


def lm_loss_and_grads(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token loss over `input_ids` and the gradients by canonical parameter name."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids[:, :-1]).logits
    loss = token_loss_sum(logits, input_ids[:, 1:])
    loss.backward()
    return loss.detach(), {canonical_name(n): p.grad.clone() for n, p in model.named_parameters()}


def assert_bitwise(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, f"gradients differ bitwise: {differing[:5]}"
