"""The layouts a plan considers, as recipe overrides, each accepted by harness/validation.py."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from harness.config import Config, ConfigError
from harness.model_parts import expert_count
from harness.validation import validate
from parallel.mesh import ParallelDims
from parallel.pipeline import SCHEDULES, default_stages_per_rank

# Uniform AC modes a plan weighs (plus budget where validation takes it); `submodule` keeps
# about what selective keeps at a higher recompute cost, so it never wins.
AC_CHOICES = ("none", "selective", "full")
# Largest pipeline degree tried: beyond it the bubble and the stage imbalance dominate.
MAX_PP = 16
MAX_MICRO_BATCH = 16


@dataclass(frozen=True)
class Layout:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    micro_batch_size: int
    pp_schedule: str | None = None
    pp_microbatches: int = 1
    ac_mode: str = "none"
    ac_budget_mib: float | None = None
    cp: int = 1

    @property
    def stages_per_rank(self) -> int:
        return default_stages_per_rank(self.pp_schedule) if self.pp > 1 else 1

    def overrides(self) -> dict[str, dict[str, object]]:
        """The recipe sections this layout sets."""
        parallel = {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp,
                    "tp": self.tp, "ep": self.ep}
        if self.pp > 1:
            parallel.update(pp_schedule=self.pp_schedule, pp_microbatches=self.pp_microbatches)
        ac = {"mode": self.ac_mode}
        if self.ac_budget_mib is not None:
            ac["budget_mib"] = self.ac_budget_mib
        return {"parallel": parallel, "train": {"micro_batch_size": self.micro_batch_size}, "ac": ac}

    def describe(self) -> str:
        axes = [f"{name}{value}" for name, value in (("pp", self.pp), ("dpr", self.dp_replicate),
                                                     ("fsdp", self.dp_shard), ("cp", self.cp), ("tp", self.tp),
                                                     ("ep", self.ep))
                if value > 1]
        text = " ".join(axes) or "1 rank"
        if self.pp > 1:
            text += f" {self.pp_schedule}/{self.pp_microbatches}"
        return text


def apply_layout(cfg: Config, layout: Layout) -> Config:
    """A copy of `cfg` running `layout`."""
    out = copy.deepcopy(cfg)
    for section, values in layout.overrides().items():
        for key, value in values.items():
            setattr(getattr(out, section), key, value)
    if layout.ac_budget_mib is None:
        out.ac.budget_mib = None
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(limit.bit_length()) if 2**k <= limit]


def _meshes(world: int, gpus_per_node: int, experts: int) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(pp, dp_replicate, dp_shard, cp, tp, ep) the mesh accepts: tp x cp inside a node (both
    communicate at every layer), HSDP only with node-sized or larger shard groups, ep dividing the
    experts."""
    for pp in (d for d in _divisors(world) if d <= MAX_PP):
        for tp in (d for d in _divisors(world // pp) if d <= gpus_per_node):
            for cp in (d for d in _divisors(world // (pp * tp)) if d * tp <= gpus_per_node):
                data = world // (pp * tp * cp)
                for dp_replicate in _divisors(data):
                    dp_shard = data // dp_replicate
                    if dp_replicate > 1 and (dp_shard * cp * tp) % gpus_per_node:
                        continue
                    for ep in _divisors(dp_shard * cp):
                        if ep > 1 and (not experts or experts % ep):
                            continue
                        try:
                            ParallelDims(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp, ep=ep,
                                         world_size=world)
                        except ValueError:
                            continue
                        yield pp, dp_replicate, dp_shard, cp, tp, ep


def _batches(cfg: Config, pp: int, dp: int) -> Iterator[tuple[int, str | None, int]]:
    """(micro_batch_size, schedule, pipeline microbatches): without pp every micro batch that
    splits the global batch; with pp, microbatches of 1 or 2 sequences, pp to 4 x pp of them."""
    per_rank = cfg.train.global_batch_size // dp if cfg.train.global_batch_size % dp == 0 else 0
    if pp == 1:
        for micro in _powers_of_two(min(per_rank, MAX_MICRO_BATCH)):
            if per_rank % micro == 0:
                yield micro, None, 1
        return
    for schedule in SCHEDULES:
        for count in (pp, 2 * pp, 4 * pp):
            for rows in (1, 2):
                micro = count * rows
                if per_rank and per_rank % micro == 0:
                    yield micro, schedule, count


def candidate_layouts(cfg: Config, world: int, gpus_per_node: int) -> list[Layout]:
    """Every mesh, batch split and pipeline schedule proposed for `cfg` on `world` ranks, in each
    uniform AC mode; validation judges them later (`refusal`), only those a plan shows."""
    from harness.models import load_config

    experts = expert_count(load_config(cfg.model.preset, cfg.model.path, cfg.model.overrides))
    return [Layout(pp, dpr, dps, tp, ep, micro, schedule, count, mode, cp=cp)
            for pp, dpr, dps, cp, tp, ep in _meshes(world, gpus_per_node, experts)
            for micro, schedule, count in _batches(cfg, pp, dpr * dps)
            for mode in AC_CHOICES]


def validated_form(layout: Layout) -> Layout:
    """What validation is asked about `layout`: its mesh, batch and schedule under ac.mode=none
    (the uniform modes are accepted alike; budget's own limits are the planner's to respect)."""
    return dataclasses.replace(layout, ac_mode="none", ac_budget_mib=None)


def refusal(cfg: Config, layout: Layout, world: int) -> str | None:
    """Validation's one-line refusal of `layout` for `cfg` on `world` ranks, None when it accepts it."""
    try:
        validate(apply_layout(cfg, validated_form(layout)), world)
    except ConfigError as e:
        return str(e)
    return None
