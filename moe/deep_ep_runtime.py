"""What the DeepEP and HybridEP backends share: loading `deep_ep`, what their start-up checks
share (every rank's facts, the row size the kernels copy), one communication buffer per process
and group, the table that carries layout handles across the op boundary, and the combine op both
backends register.

Handles cross the op boundary as ids: a dispatch op returns a small CPU int64 tensor naming a
handle kept here, so the op's outputs are plain tensors that selective activation checkpointing
can save; the recompute then reuses the saved id and never communicates. A handle is dropped by
the backward of its dispatch (its last user), right after its combine when no backward will come
(a no-grad forward), or at the end of the backward that replayed a fully checkpointed layer
(whose backward reads the first forward's handle, not the replay's).
"""

from __future__ import annotations

import atexit
import itertools
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes

from moe.balance import is_recomputing


def load_deep_ep() -> Any:
    """The deep_ep module; RuntimeError with the reason it cannot run here."""
    try:
        import deep_ep
    except Exception as exc:  # deep_ep can fail with more than ImportError (CUDA/NVSHMEM init)
        raise RuntimeError(f"not installed ({type(exc).__name__}: {exc})") from exc
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    return deep_ep


def gather_facts(group: dist.ProcessGroup, facts: Any) -> list[Any]:
    """`facts` of every rank of `group`, in group rank order (collective).

    The start-up checks decide on this list, the same on every rank, so no two ranks choose
    different dispatchers (a split choice would hang the first dispatch).
    """
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, facts, group=group)
    return gathered


def first_problem(problems: list[str | None]) -> str | None:
    """The first rank's reason not to run, named by rank unless every rank has it."""
    found = [(rank, problem) for rank, problem in enumerate(problems) if problem is not None]
    if not found:
        return None
    rank, problem = found[0]
    return problem if len(found) == len(problems) and len(set(problems)) == 1 else f"rank {rank}: {problem}"


def host_block_size(hosts: list[str]) -> int | None:
    """How many ranks each host holds when the group is one block of consecutive ranks per host,
    all blocks the same size; None for any other placement."""
    size = hosts.count(hosts[0])
    blocks = [hosts[i:i + size] for i in range(0, len(hosts), size)]
    if len(hosts) % size or any(len(set(block)) != 1 for block in blocks) or len({b[0] for b in blocks}) != len(blocks):
        return None
    return size


# Both kernels move bfloat16 rows only (fp8 needs scales this harness does not produce), copied in
# whole 16-byte units (int4 loads, TMA); upstream asserts that at the first dispatch.
_ROW_BYTES_MULTIPLE = 16
_BF16_BYTES = 2


def row_size_problem(hidden_size: int) -> str | None:
    if hidden_size * _BF16_BYTES % _ROW_BYTES_MULTIPLE:
        return (f"hidden size {hidden_size} makes rows of {hidden_size * _BF16_BYTES} bytes; the kernels copy rows "
                f"in {_ROW_BYTES_MULTIPLE}-byte units (a hidden size divisible by {_ROW_BYTES_MULTIPLE // _BF16_BYTES})")
    return None


def check_bf16(name: str, x: torch.Tensor) -> None:
    if x.dtype != torch.bfloat16:
        raise ValueError(f"moe.dispatcher={name}: the kernels move bfloat16 hidden states only, got {x.dtype}; "
                         "train in bf16 (CUDA mixed precision) or choose moe.dispatcher=alltoall")


# One buffer per (backend, group) for the whole process: upstream allocates NVLink/RDMA memory
# and exchanges IPC handles per buffer, so interleaved pipeline stages share it.
_BUFFERS: dict[tuple[str, str], Any] = {}


def get_buffer(backend: str, group_name: str) -> Any:
    return _BUFFERS[(backend, group_name)]


def ensure_buffer(backend: str, group: dist.ProcessGroup, fits: Callable[[Any], bool],
                  create: Callable[[], Any]) -> Any:
    """The process's buffer for `backend` on `group`, (re)created by `create` unless it `fits`.

    Creation exchanges handles between ranks: it runs outside any active selective-checkpoint
    mode, which would otherwise record it for a replay.
    """
    key = (backend, group.group_name)
    buffer = _BUFFERS.get(key)
    if buffer is None or not fits(buffer):
        with _disable_current_modes():
            if buffer is not None:
                _destroy(buffer)
            buffer = _BUFFERS[key] = create()
    return buffer


def _destroy(buffer: Any) -> None:
    # Buffers made with `explicitly_destroy=True` must be destroyed by hand: upstream's
    # destructor can hang at interpreter exit (deepseek-ai/DeepEP Buffer docstring).
    if getattr(buffer, "explicitly_destroy", False):
        buffer.destroy()


@atexit.register
def destroy_buffers() -> None:
    """Frees every buffer; call it on every rank before the process group goes (at exit otherwise)."""
    while _BUFFERS:
        _destroy(_BUFFERS.popitem()[1])


_HANDLES: dict[int, Any] = {}
_NEXT_ID = itertools.count()


def store_handle(handle: Any) -> torch.Tensor:
    handle_id = next(_NEXT_ID)
    _HANDLES[handle_id] = handle
    if is_recomputing():
        # Only the replayed combine (if the replay gets that far) reads a replay's handle.
        torch.autograd.Variable._execution_engine.queue_callback(partial(_HANDLES.pop, handle_id, None))
    return torch.tensor(handle_id, dtype=torch.int64)


def get_handle(handle_id: torch.Tensor) -> Any:
    return _HANDLES[int(handle_id)]


def release_handle(handle_id: torch.Tensor) -> None:
    _HANDLES.pop(int(handle_id), None)


def release_unless_backward(combined: torch.Tensor, handle_id: torch.Tensor) -> None:
    """After a combine: drop the handle when no backward will read it (a no-grad forward)."""
    if not (torch.is_grad_enabled() and combined.requires_grad):
        release_handle(handle_id)


def fake_handle_id() -> torch.Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu")


def define_combine(backend: str, combine: Callable[[Any, torch.Tensor, Any], torch.Tensor],
                   dispatch_cached: Callable[[Any, torch.Tensor, Any], torch.Tensor]) -> None:
    """Registers `<backend>::combine`: expert outputs back to the ranks their tokens came from,
    summed per token; its backward re-sends the gradient along the dispatch's cached layout.

    `combine(buffer, y, handle)` and `dispatch_cached(buffer, grad, handle)` call the kernels.
    """

    @torch.library.custom_op(f"{backend}::combine", mutates_args=())
    def combine_op(y: torch.Tensor, handle_id: torch.Tensor, num_tokens: int, group_name: str) -> torch.Tensor:
        return combine(get_buffer(backend, group_name), y.contiguous(), get_handle(handle_id))

    @combine_op.register_fake
    def _(y, handle_id, num_tokens, group_name):
        return y.new_empty(num_tokens, y.shape[1])

    def setup_context(ctx, inputs, output) -> None:
        _, ctx.handle_id, _, ctx.group_name = inputs

    def backward(ctx, grad: torch.Tensor):
        grad_y = dispatch_cached(get_buffer(backend, ctx.group_name), grad.contiguous(), get_handle(ctx.handle_id))
        return grad_y, None, None, None

    combine_op.register_autograd(backward, setup_context=setup_context)
