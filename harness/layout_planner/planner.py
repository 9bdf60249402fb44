"""A plan: every accepted layout predicted, budget AC fitted to what memory is left, ranked."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from harness.config import Config
from harness.layout_planner.activations import measure_profile
from harness.layout_planner.devices import Device
from harness.layout_planner.layouts import AC_CHOICES, Layout, accepted_layouts
from harness.layout_planner.predict import ModelFacts, Prediction, model_facts, predict
from harness.models import build_meta_model, load_config
from parallel.ac_budget import BUDGET_MODE, greedy_sequence

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    predictions: list[Prediction]  # fitting layouts first, fastest first; then the rest, smallest first
    facts: ModelFacts
    layouts_validated: int

    @property
    def best(self) -> Prediction | None:
        return self.predictions[0] if self.predictions and self.predictions[0].fits else None


def model_facts_for(cfg: Config, device: Device, progress: Progress) -> ModelFacts:
    model = build_meta_model(load_config(cfg.model.preset, cfg.model.path, cfg.model.overrides))
    profile = measure_profile(model, cfg.train.seq_len, device.compute_dtype, progress)
    return model_facts(model, profile, cfg.train.seq_len)


def _budget_prediction(facts: ModelFacts, layout: Layout, cfg: Config, world: int, gpus_per_node: int,
                       device: Device, plans: list[tuple[str, ...]]) -> Prediction | None:
    """The layout under ac.mode=budget with the activation memory the device has left, when the
    cheapest plan that fits mixes modes (a uniform one is already among the candidates).
    Validation takes budget only without pipeline, tensor and context parallel and compile."""
    if layout.pp > 1 or layout.tp > 1 or layout.cp > 1 or cfg.train.compile:
        return None
    none = predict(facts, layout, cfg, world, gpus_per_node, device)
    room = device.memory_bytes - device.reserve_bytes - none.state.total
    rows = layout.micro_batch_size
    remainder = rows * facts.profile.remainder_bytes
    all_layers = list(range(len(facts.state.layers)))
    for modes in plans:
        if facts.profile.kept(modes, all_layers, rows) + remainder <= room:
            if len(set(modes)) == 1:
                return None
            budget_mib = float(room // 2**20)
            budget = dataclasses.replace(layout, ac_mode=BUDGET_MODE, ac_budget_mib=budget_mib)
            return predict(facts, budget, cfg, world, gpus_per_node, device, layer_modes=modes)
    return None


def make_plan(cfg: Config, world: int, gpus_per_node: int, device: Device, progress: Progress) -> Plan:
    layouts = accepted_layouts(cfg, world, gpus_per_node, progress)
    facts = model_facts_for(cfg, device, progress)
    progress(f"predicting {len(layouts)} layouts")
    predictions = [predict(facts, layout, cfg, world, gpus_per_node, device) for layout in layouts]
    plans = greedy_sequence(facts.profile.layers)
    for layout in {dataclasses.replace(layout, ac_mode="none") for layout in layouts}:
        budget = _budget_prediction(facts, layout, cfg, world, gpus_per_node, device, plans)
        if budget is not None:
            predictions.append(budget)
    fitting = sorted((p for p in predictions if p.fits), key=lambda p: (p.step_s, p.peak_bytes))
    rest = sorted((p for p in predictions if not p.fits), key=lambda p: p.peak_bytes)
    return Plan(predictions=fitting + rest, facts=facts, layouts_validated=len(layouts) // len(AC_CHOICES))
