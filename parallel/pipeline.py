"""Pipeline parallel: stage placement, schedules, and one training step over them.

The trainer calls `validate_pipeline` before any process starts and `pipeline_model` once the
pp mesh exists. `parallelize_fn` (EP -> AC -> FSDP2 -> materialize) runs on each stage module
this rank holds; under pipeline parallel FSDP should keep parameters gathered between
microbatches (`reshard_after_forward=False`) and sum gradients over shards (divide factor 1),
because the loss is already divided by the step's global token count. For the same reason the
schedules run with `scale_grads=False`: microbatch losses are summed, never averaged.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (PipelineScheduleMulti, PipelineScheduleSingle,
                                                    get_schedule_class)

from parallel.pipeline_split import LayerSpec, stage_module_names

# Placement of stages on ranks, by schedule. "loop": rank r holds r, r+pp, ...; "v": rank r holds
# r and 2*pp-1-r, so the first and last stages share rank 0.
ScheduleName = Literal["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
                       "DualPipeV"]
SCHEDULES: tuple[str, ...] = typing.get_args(ScheduleName)
SINGLE_STAGE = ("GPipe", "1F1B")
LOOPED = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
V_SHAPED = ("ZBVZeroBubble", "DualPipeV")
assert set(SINGLE_STAGE + LOOPED + V_SHAPED) == set(SCHEDULES), "every schedule has one placement"


def default_stages_per_rank(schedule: str) -> int:
    return 1 if schedule in SINGLE_STAGE else 2


def stage_ids_for_rank(schedule: str, pp: int, stages_per_rank: int, rank: int) -> list[int]:
    if schedule in V_SHAPED:
        assert stages_per_rank == 2, "V schedules hold exactly two stages per rank"
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(stages_per_rank)]


def validate_pipeline(num_layers: int, pp: int, schedule: str, stages_per_rank: int | None,
                      n_microbatches: int, layers_per_stage: LayerSpec, local_batch_size: int) -> int:
    """Raises ValueError (one line: the config field and the fix) for a layout that cannot run;
    returns the number of stages per rank."""
    per_rank = _validate_layout(num_layers, pp, schedule, stages_per_rank, n_microbatches, layers_per_stage)
    if local_batch_size % n_microbatches:
        raise ValueError(f"parallel.pp_microbatches={n_microbatches}: the local batch of {local_batch_size} "
                         f"sequences does not split into {n_microbatches} equal microbatches; pick a divisor "
                         f"of {local_batch_size}")
    return per_rank


def _validate_layout(num_layers: int, pp: int, schedule: str, stages_per_rank: int | None,
                     n_microbatches: int, layers_per_stage: LayerSpec) -> int:
    """Checks everything but the batch; returns the number of stages per rank."""
    if pp < 2:
        raise ValueError(f"parallel.pp={pp}: pipeline parallel needs at least 2 ranks; set parallel.pp>=2 "
                         f"or run without a pipeline")
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r}: unknown schedule; choose one of {list(SCHEDULES)}")
    per_rank = stages_per_rank or default_stages_per_rank(schedule)
    if schedule in SINGLE_STAGE and per_rank != 1:
        raise ValueError(f"parallel.pp_schedule={schedule}: a single-stage schedule holds 1 stage per rank, "
                         f"not {per_rank}; set parallel.pp_stages_per_rank=1 or pick one of {list(LOOPED)}")
    if schedule in LOOPED and per_rank < 2:
        raise ValueError(f"parallel.pp_schedule={schedule}: a multi-stage schedule needs >= 2 stages per rank, "
                         f"not {per_rank}; set parallel.pp_stages_per_rank>=2 or pick one of {list(SINGLE_STAGE)}")
    if schedule in V_SHAPED and per_rank != 2:
        raise ValueError(f"parallel.pp_schedule={schedule}: a V schedule holds exactly 2 stages per rank, "
                         f"not {per_rank}; set parallel.pp_stages_per_rank=2")
    num_stages = pp * per_rank
    minimum = _min_microbatches(schedule, pp, num_stages)
    if n_microbatches < minimum:
        raise ValueError(f"parallel.pp_microbatches={n_microbatches}: {schedule} over {num_stages} stages on "
                         f"{pp} ranks needs at least {minimum} microbatches; raise parallel.pp_microbatches")
    rounds = max(1, n_microbatches // pp)
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble") and n_microbatches % rounds:
        raise ValueError(f"parallel.pp_microbatches={n_microbatches}: {schedule} runs microbatches in rounds of "
                         f"parallel.pp={pp}; use a multiple of {pp}")
    stage_module_names(num_layers, num_stages, layers_per_stage)
    return per_rank


def _min_microbatches(schedule: str, pp: int, num_stages: int) -> int:
    """Torch refuses 1F1B and DualPipeV with fewer microbatches than stages, but only inside the
    workers. Multi-stage schedules with fewer microbatches than ranks have hung in some torch
    versions and leave ranks idle for the whole step anyway, so they need at least pp."""
    if schedule in ("1F1B", "DualPipeV"):
        return num_stages
    if schedule in LOOPED or schedule in V_SHAPED:
        return pp
    return 1


@dataclass
class PipelinePlan:
    """What this rank runs: its stage modules and the schedule that drives them."""

    schedule: PipelineScheduleSingle | PipelineScheduleMulti
    stage_modules: list[nn.Module]
    has_first_stage: bool
    has_last_stage: bool

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of every microbatch; the summed loss on ranks with the last stage.

        Every rank passes its batch; only the first stage reads the ids and the last the labels.
        """
        losses: list[torch.Tensor] | None = [] if self.has_last_stage else None
        inputs = (input_ids,) if self.has_first_stage else ()
        target = labels if self.has_last_stage else None
        self.schedule.step(*inputs, target=target, losses=losses, return_outputs=False)
        if losses is None:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum()


def _stage_io(config, stage_id: int, num_stages: int, microbatch_shape: tuple[int, int],
              dtype: torch.dtype, carried: tuple[torch.Tensor, ...],
              sequence_shards: int) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
    """Meta examples of a stage's input (token ids or hidden states) and output (hidden or
    logits), each followed by the `carried` tensors except the first stage's input. Hidden
    states hold 1/sequence_shards of each sequence; logits (a DTensor under tensor parallel)
    have the global shape."""
    rows, seq = microbatch_shape
    meta = torch.device("meta")
    # requires_grad tells the stage that gradients flow back through these tensors.
    hidden = torch.empty(rows, seq // sequence_shards, config.hidden_size, dtype=dtype, device=meta,
                         requires_grad=True)
    ids = torch.empty(rows, seq, dtype=torch.long, device=meta)
    logits = torch.empty(rows, seq, config.vocab_size, dtype=dtype, device=meta, requires_grad=True)
    received = ids if stage_id == 0 else hidden
    sent = logits if stage_id == num_stages - 1 else hidden
    return {"input_args": (received, *carried) if carried and stage_id > 0 else received,
            "output_args": (sent, *carried) if carried else sent}


def pipeline_model(build_stage: Callable[[list[str]], nn.Module], num_layers: int, pp_mesh: DeviceMesh, *,
                   schedule: str, n_microbatches: int,
                   stages_per_rank: int | None, layers_per_stage: LayerSpec,
                   parallelize_fn: Callable[[nn.Module], None], device: torch.device | str,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   microbatch_shape: tuple[int, int], activation_dtype: torch.dtype = torch.float32,
                   carried: tuple[torch.Tensor, ...] = (), sequence_shards: int = 1) -> PipelinePlan:
    """Build this rank's stages (`build_stage(module names)`, normally on meta, for a model of
    `num_layers` decoder layers), parallelize them, and build the schedule. `loss_fn(output,
    labels)` is the microbatch's share of the step loss, where `output` is the last stage's
    logits, or a tuple of them and the `carried` tensors.

    `microbatch_shape` (rows, seq_len) and `activation_dtype` describe what travels between
    stages up front: without them torch infers it by running the first microbatch through an
    extra forward and backward, which side effects (expert load counts) would see. `carried`:
    meta examples of tensors each stage hands the next after its hidden states, with gradients
    flowing back (statistics a loss at the end needs from every stage). `sequence_shards`: the
    tp degree; under sequence parallel stages hand on this rank's slice of each sequence."""
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    per_rank = _validate_layout(num_layers, pp, schedule, stages_per_rank, n_microbatches, layers_per_stage)
    num_stages = pp * per_rank
    stage_ids = stage_ids_for_rank(schedule, pp, per_rank, rank)
    names = stage_module_names(num_layers, num_stages, layers_per_stage)
    modules = [build_stage(names[stage_id]) for stage_id in stage_ids]
    for module in modules:
        parallelize_fn(module)
    group = pp_mesh.get_group()
    stages = [PipelineStage(module, stage_id, num_stages, torch.device(device), group=group,
                            **_stage_io(module.config, stage_id, num_stages, microbatch_shape, activation_dtype,
                                          carried, sequence_shards))
              for module, stage_id in zip(modules, stage_ids)]
    schedule_class = get_schedule_class(schedule)
    if schedule in SINGLE_STAGE:
        runner = schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    else:
        runner = schedule_class(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return PipelinePlan(schedule=runner, stage_modules=modules, has_first_stage=0 in stage_ids,
                        has_last_stage=num_stages - 1 in stage_ids)
