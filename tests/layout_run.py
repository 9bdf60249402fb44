"""Run the harness's trainer on the ranks of a test and collect losses and full parameters."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from harness.config import Config
from harness.trainer import build_run, checkpoint_run, train_step
from harness.validation import validate


def train_layout(rank: int, world_size: int, cfg: Config,
                 checkpoint_root: str | None = None) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Losses and gradient norms of every step, and this rank's parameters gathered to full tensors;
    with `checkpoint_root`, a checkpoint of the trained run under it."""
    plan = validate(cfg, world_size)
    run = build_run(cfg, plan)
    rows = [train_step(run) for _ in range(cfg.train.steps)]
    if checkpoint_root is not None:
        checkpoint_run(run, checkpoint_root)
    params: dict[str, torch.Tensor] = {}
    for module in run.modules:
        params.update(get_model_state_dict(module, options=StateDictOptions(full_state_dict=True)))
    return [r["loss"] for r in rows], [r["grad_norm"] for r in rows], params


def assert_matches_reference(results, reference, atol_loss: float = 1e-5, atol_param: float = 1e-4) -> None:
    """Every rank's losses and gradient norms equal the reference's; the union of ranks' parameters
    covers and equals it (Adam turns 1e-6 gradient noise into ~1e-5 parameter noise at lr 1e-2, and
    up to ~5e-5 on an entry whose gradient is near 0, where the update is noise over noise)."""
    ref_losses, ref_norms, ref_params = reference
    seen = set()
    for losses, norms, params in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=atol_loss, rtol=0)
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), atol=0, rtol=1e-5)
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], atol=atol_param, rtol=0, msg=lambda m: f"{name}: {m}")
            seen.add(name)
    assert seen == set(ref_params), f"parameters never compared: {sorted(set(ref_params) - seen)}"
