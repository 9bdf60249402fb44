"""What a plan prints and writes: the ranked table, the best layout's overrides, its recipe."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from harness.layout_planner.devices import Device
from harness.layout_planner.planner import Plan
from harness.layout_planner.predict import Prediction

GiB = 2**30


def _ac(prediction: Prediction) -> str:
    layout = prediction.layout
    return f"budget {layout.ac_budget_mib / 1024:.0f}G" if layout.ac_budget_mib is not None else layout.ac_mode


def table(plan: Plan, device: Device, world: int, rows: int) -> list[str]:
    """The ranked table (the first `rows` fitting layouts, then the smallest that do not fit)."""
    fitting = [p for p in plan.predictions if p.fits][:rows]
    rest = [p for p in plan.predictions if not p.fits][:max(3, rows - len(fitting)) if fitting else rows]
    lines = ["| # | layout | micro batch | AC | peak GiB/rank (state + act) | fits | step s | tokens/s | "
             "MFU | dominant |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for index, p in enumerate(fitting + rest, 1):
        mfu = p.tokens_per_s / world * plan.facts.flops_per_token / (device.peak_tflops * 1e12)
        lines.append(f"| {index if p.fits else '-'} | {p.layout.describe()} | {p.layout.micro_batch_size} | "
                     f"{_ac(p)} | {p.peak_bytes / GiB:.1f} ({p.state.total / GiB:.1f} + "
                     f"{p.activation_bytes / GiB:.1f}) | {'yes' if p.fits else 'no'} | {p.step_s:.3g} | "
                     f"{p.tokens_per_s:,.0f} | {mfu:.0%} | {p.dominant} |")
    return lines


def recipe_overrides(prediction: Prediction) -> list[str]:
    """The best layout as `--section.field=value` flags."""
    return [f"--{section}.{key}={value}" for section, values in prediction.layout.overrides().items()
            for key, value in values.items()]


def best_recipe(recipe: dict[str, Any], prediction: Prediction) -> dict[str, Any]:
    """The user's recipe (as written) with the best layout's fields set."""
    out = copy.deepcopy(recipe)
    for section, values in prediction.layout.overrides().items():
        out.setdefault(section, {}).update(values)
    if prediction.layout.ac_budget_mib is None and "budget_mib" in out.get("ac", {}):
        del out["ac"]["budget_mib"]
    return out


def write_recipe(path: str, recipe: dict[str, Any]) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
