"""Start the workers with torch.distributed.run (the torchrun elastic agent)."""

from __future__ import annotations

import os
import signal

from torch.distributed import run as torchrun_module

# Flags that choose a rendezvous; without any of them the job is one node on localhost.
_RENDEZVOUS_FLAGS = ("--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend",
                     "--master-addr", "--master_addr", "--master-port", "--master_port", "--standalone")


def spawn_workers(config_args: list[str], torchrun: list[str], nproc_per_node: int) -> int:
    """Runs `python -m launch <config_args>` on every rank; returns the agent's exit code."""
    args = list(torchrun)
    if not any(a.split("=")[0] in ("--nproc-per-node", "--nproc_per_node") for a in args):
        args += ["--nproc-per-node", str(nproc_per_node)]
    if not any(a.split("=")[0] in _RENDEZVOUS_FLAGS for a in args):
        # One node: rendezvous on a free localhost port, so two jobs on one box never collide.
        args.append("--standalone")
    # torchrun does not handle SIGUSR1 (its default action would kill the agent and orphan the
    # workers); pass it on to the workers, which checkpoint and exit (see harness.preemption).
    signal.signal(signal.SIGUSR1, _forward_to_workers)
    try:
        torchrun_module.main([*args, "--module", "launch", *config_args])
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # the agent raises ChildFailedError with every failing rank's summary
        print(f"error: workers failed: {e}", flush=True)
        return 1
    return 0


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
