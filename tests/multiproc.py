"""Run a function on N real gloo ranks, each its own process (forked from a forkserver).

Each rank joins one process group through a FileStore in a fresh temporary folder (no port
to race for under pytest-xdist), runs `fn(rank, world_size, *args)`, and reports either its
return value or its traceback. A barrier runs before the group is destroyed, since gloo was
seen aborting at teardown without one ("terminate called without an active exception"; torch's
own distributed tests do the same: https://github.com/pytorch/pytorch/pull/124961).
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(fn: Callable, rank: int, world_size: int, store_path: str, args: tuple, results,
               environ: dict[str, str]) -> None:
    torch.set_num_threads(1)
    # A forkserver child starts from the server's environment, not the caller's.
    os.environ.clear()
    os.environ.update(environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=120))
        # Pickled to bytes here: tensors sent through the queue as shared memory vanish when
        # this process exits before the parent has read them.
        value = pickle.dumps(fn(rank, world_size, *args))
        dist.barrier()
        results.put((rank, "ok", value))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context() -> mp.context.BaseContext:
    """A forkserver that has imported torch and transformers once: each rank forks from it
    instead of importing them again (seconds per rank, most of a short test's time). The
    server imports nothing of the harness and never joins a process group, so a rank starts as
    clean as a spawned one."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.checkpoint", "torch.distributed.fsdp",
                                "torch.distributed.pipelining", "torch.distributed.tensor", "transformers.modeling_utils"])
    return ctx


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """Returns `fn`'s result per rank; raises with the first failing rank's traceback."""
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, store_path, args, results, dict(os.environ)))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outcome: dict[int, tuple[str, Any]] = {}
        try:
            while len(outcome) < world_size:
                try:
                    rank, status, value = results.get(timeout=timeout)
                except queue.Empty:
                    missing = sorted(set(range(world_size)) - set(outcome))
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s") from None
                outcome[rank] = (status, value)
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [pickle.loads(outcome[r][1]) for r in range(world_size)]
