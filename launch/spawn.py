"""Start the workers with torch.distributed.run (the torchrun elastic agent)."""

from __future__ import annotations

from torch.distributed import run as torchrun_module


def spawn_workers(config_args: list[str], torchrun: list[str], world_size: int) -> int:
    """Runs `python -m launch <config_args>` on every rank; returns the agent's exit code."""
    args = list(torchrun)
    if not any(a.split("=")[0] in ("--nproc-per-node", "--nproc_per_node") for a in args):
        args += ["--nproc-per-node", str(world_size)]
    if not any(a.split("=")[0] in ("--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--standalone") for a in args):
        # One node: rendezvous on a free localhost port, so two jobs on one box never collide.
        args.append("--standalone")
    try:
        torchrun_module.main([*args, "--module", "launch", *config_args])
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # the agent raises ChildFailedError with every failing rank's summary
        print(f"error: workers failed: {e}", flush=True)
        return 1
    return 0
