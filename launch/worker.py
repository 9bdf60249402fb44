"""What each torchrun worker does: process group, threads, train, clean teardown.

A worker that fails writes its traceback to the run folder (`logs/rank_XXXXX.log`) and its
one-line message to torchrun's per-rank error file, then exits 1 without printing: the
launcher reports the first failing rank in one line (launch/spawn.py), not one traceback per rank.
"""

from __future__ import annotations

import logging
import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from harness.config import Config
from harness.plan import Plan
from harness.preemption import PreemptionRequest
from harness.run_folder import RunFolder
from harness.trainer import train
from moe.deep_ep_runtime import destroy_buffers


def run_worker(cfg: Config, plan: Plan) -> int:
    """Trains on this rank; returns the exit code (1 when training raised)."""
    try:
        _run(cfg, plan)
    except Exception as e:
        _record_failure(plan.folder, e)
        return 1
    return 0


def _record_failure(folder: RunFolder, error: Exception) -> None:
    log = folder.log_file(int(os.environ.get("RANK", "0")))
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        f.write(traceback.format_exc())
    ErrorHandler().record_exception(error)  # no-op outside torchrun (no error file to write)


def _run(cfg: Config, plan: Plan) -> None:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    else:
        backend = "gloo"
        # N ranks on one box share its cores; more threads than cores per rank only thrashes.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    # Rank 0 speaks for the job; the others only report errors, so a warning shows once.
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.ERROR,
                        format="%(message)s")
    # Installed before the process group exists: a signal that arrives during start-up still counts.
    preemption = PreemptionRequest()
    _init_process_group(backend, timedelta(minutes=10))
    try:
        train(cfg, plan, preemption)
        # gloo was seen aborting at teardown ("terminate called without an active exception")
        # when ranks destroy the group while others still talk.
        dist.barrier()
    finally:
        # DeepEP buffers must go before their process group (their destructor can hang at exit).
        destroy_buffers()
        dist.destroy_process_group()


def _init_process_group(backend: str, timeout: timedelta) -> None:
    """The default group, on torchrun's store under a prefix per restart attempt.

    torchrun's agent keeps one TCPStore across restarts, and `env://` initialisation writes the
    same keys on every attempt: after a worker was restarted, a rank could read a dead peer's
    gloo address left by the previous attempt and fail with "Connection refused".
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}/", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
