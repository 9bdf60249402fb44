"""Run a layout for real on gloo ranks and measure what the planner predicts: peak RSS growth per
rank and the step time."""

from __future__ import annotations

import time

import torch

from harness.config import Config
from harness.memory import peak_rss_bytes, reset_peak_rss, rss_bytes, state_bytes
from harness.validation import validate


def measure_layout(rank: int, world_size: int, cfg: Config) -> dict[str, float]:
    """Per rank: RSS growth over the RSS before `build_run`, at its peak over the build and
    `cfg.train.steps` steps, the time of the fastest step after the first, and the bytes of its
    parameter and optimizer-state shards (harness/memory.py; gradients are freed after a step)."""
    from harness.trainer import build_run, train_step

    torch.set_num_threads(1)
    plan = validate(cfg, world_size)
    before = rss_bytes()
    reset_peak_rss()
    run = build_run(cfg, plan)
    times = []
    for _ in range(cfg.train.steps):
        started = time.perf_counter()
        train_step(run)
        times.append(time.perf_counter() - started)
    params = [p for module in run.modules for p in module.parameters()]
    state = state_bytes(params, run.optimizer)
    return {"peak_growth": peak_rss_bytes() - before, "step_s": min(times[1:] or times),
            "state_bytes": sum(state.values())}
