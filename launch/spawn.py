"""Start the workers with torch.distributed.run (the torchrun elastic agent)."""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed import run as torchrun_module
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from harness.nonfinite import TrainingStopped
from harness.run_folder import RunFolder

# Flags that choose a rendezvous; without any of them the job is one node on localhost.
_RENDEZVOUS_FLAGS = ("--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend",
                     "--master-addr", "--master_addr", "--master-port", "--master_port", "--standalone")


def spawn_workers(config_args: list[str], torchrun: list[str], nproc_per_node: int, folder: RunFolder) -> int:
    """Runs `python -m launch <config_args>` on every rank; returns 0, or 1 after one line that
    names the first failing rank, its message and its log (or why every rank stopped training)."""
    args = list(torchrun)
    if not any(a.split("=")[0] in ("--nproc-per-node", "--nproc_per_node") for a in args):
        args += ["--nproc-per-node", str(nproc_per_node)]
    if not any(a.split("=")[0] in _RENDEZVOUS_FLAGS for a in args):
        # One node: rendezvous on a free localhost port, so two jobs on one box never collide.
        args.append("--standalone")
    # torchrun does not handle SIGUSR1 (its default action would kill the agent and orphan the
    # workers); pass it on to the workers, which checkpoint and exit (see harness.preemption).
    signal.signal(signal.SIGUSR1, _forward_to_workers)
    _quiet_agent()
    # torchrun prints a five-line banner when it sets this itself; each worker sets its own
    # thread count (launch/worker.py), so the value only keeps OpenMP from oversubscribing meanwhile.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        torchrun_module.main([*args, "--module", "launch", *config_args])
    except SystemExit as e:
        return int(e.code or 0)
    except ChildFailedError as e:
        print(f"error: {failure_line(e, folder)}", file=sys.stderr, flush=True)
        return 1
    return 0


def _quiet_agent() -> None:
    """The agent logs every failing and every stopped rank; the one line of `failure_line`
    replaces that. Several of its loggers set their own level, so each one is lowered."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)


def failure_line(error: ChildFailedError, folder: RunFolder) -> str:
    """The first rank that raised (by its error file's time, then rank), else the first to die.
    A `TrainingStopped` message is every rank's: it is the line, whole."""
    raised = {rank: f for rank, f in error.failures.items() if isinstance(f.message, dict)}
    if raised:
        rank = min(raised, key=lambda r: (raised[r].timestamp, r))
        text = raised[rank].message.get("message", "")
        stopped = text.removeprefix(f"{TrainingStopped.__name__}: ")
        if stopped != text:
            return stopped
        return f"rank {rank} failed: {_first_line(text)} (full log: {folder.log_file(rank)})"
    rank, failure = error.get_first_failure()
    return f"rank {rank} {_how_it_ended(failure)} before reporting an error (no log written)"


def _how_it_ended(failure: ProcessFailure) -> str:
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    return f"exited with code {failure.exitcode}"


def _first_line(text: str, limit: int = 300) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _forward_to_workers(signum: int, frame: object) -> None:
    for pid in _children(os.getpid()):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _children(parent: int) -> list[int]:
    """Direct children of `parent`, read from /proc (the workers torchrun started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name (field 2) may hold spaces; the parent pid follows its ')'.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            pids.append(int(entry))
    return pids
