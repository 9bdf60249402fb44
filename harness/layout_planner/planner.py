"""A plan: every accepted layout predicted, budget AC fitted to what memory is left, ranked."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from harness.config import Config
from harness.layout_planner.activations import measure_profile
from harness.layout_planner.devices import Device
from harness.layout_planner.layouts import Layout, candidate_layouts, refusal, validated_form
from harness.layout_planner.predict import ModelFacts, Prediction, model_facts, predict
from harness.models import build_meta_model, load_config
from parallel.ac_budget import BUDGET_MODE, greedy_sequence

Progress = Callable[[str], None]
# Refusals, with no layout yet accepted, after which a plan gives up: what refuses that many
# layouts is the recipe's own (too little data for one global batch, a model feature), not a layout's.
MAX_VALIDATED = 200


@dataclass(frozen=True)
class Plan:
    # The best layouts validation accepts: fitting ones first, fastest first; then the smallest that do not fit.
    predictions: list[Prediction]
    facts: ModelFacts
    candidates: int  # layouts predicted (AC modes and budget included)
    fitting: int  # of which fit the device's memory
    validated: int  # distinct meshes, batch splits and schedules validation was asked about

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
    Validation takes budget only without pipeline and compile; under tensor and context parallel
    this profile (the unsharded layer's, divided by tp and cp) is not what validation measures on a
    rank, so no budget plan is proposed there."""
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


def make_plan(cfg: Config, world: int, gpus_per_node: int, device: Device, progress: Progress,
              wanted: int = 15) -> Plan:
    """Every candidate layout predicted (nothing is built: cheap), then validated in ranked order
    until `wanted` fitting ones are accepted (validation builds the model: a world of 512 proposes
    tens of thousands of layouts, of which a table shows a few), plus the smallest accepted ones
    that do not fit. ValueError (one line) when validation accepts none."""
    candidates = candidate_layouts(cfg, world, gpus_per_node)
    if not candidates:
        raise ValueError(f"--world {world}: validation accepts no layout of this model on {world} ranks (no mesh "
                         "of these sizes splits train.global_batch_size); change --world or the recipe")
    facts = model_facts_for(cfg, device, progress)
    progress(f"predicting {len(candidates)} layouts")
    predictions, splittable = [], []
    for layout in candidates:
        try:
            predictions.append(predict(facts, layout, cfg, world, gpus_per_node, device))
        except ValueError:  # the model does not split so (more stages than layers): validation refuses it too
            continue
        splittable.append(layout)
    plans = greedy_sequence(facts.profile.layers)
    for layout in {validated_form(layout) for layout in splittable}:
        budget = _budget_prediction(facts, layout, cfg, world, gpus_per_node, device, plans)
        if budget is not None:
            predictions.append(budget)
    fitting = sorted((p for p in predictions if p.fits), key=lambda p: (p.step_s, p.peak_bytes))
    rest = sorted((p for p in predictions if not p.fits), key=lambda p: p.peak_bytes)
    verdicts: dict[Layout, str | None] = {}

    def accepted(prediction: Prediction) -> bool:
        key = validated_form(prediction.layout)
        if key not in verdicts:
            if len(verdicts) == MAX_VALIDATED and not any(verdict is None for verdict in verdicts.values()):
                raise ValueError(f"--world {world}: validation refuses the {MAX_VALIDATED} best-ranked layouts of "
                                 f"this model on {world} ranks (e.g. {next(iter(verdicts.values()))}); change the "
                                 "recipe or --world")
            if len(verdicts) % 25 == 0:
                progress(f"validating layouts in ranked order: {len(verdicts)} asked")
            verdicts[key] = refusal(cfg, key, world)
        return verdicts[key] is None

    shown = _first(fitting, accepted, wanted)
    shown += _first(rest, accepted, max(3, wanted - len(shown)) if shown else wanted)
    if not shown:
        reason = next(iter(verdicts.values()))
        raise ValueError(f"--world {world}: validation accepts no layout of this model on {world} ranks (e.g. "
                         f"{reason}); change --world or the recipe")
    return Plan(predictions=shown, facts=facts, candidates=len(predictions), fitting=len(fitting),
                validated=len(verdicts))


def _first(predictions: list[Prediction], accepted: Callable[[Prediction], bool], count: int) -> list[Prediction]:
    out = []
    for prediction in predictions:
        if len(out) == count:
            break
        if accepted(prediction):
            out.append(prediction)
    return out
