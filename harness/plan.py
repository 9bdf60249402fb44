"""The resolved layout of a run: what validation decided, read by everything after it.

The recipe says what the user asked for (`pp_microbatches: null`, `ac.mode: true`); the plan
says what runs (4 microbatches, "full") on one world size. Validation builds it once; the
trainer, the pipeline set-up and the start-up summary read it and never re-derive a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.config import AcMode, Config
from harness.run_folder import RunFolder
from parallel.ac_budget import BudgetPlan
from parallel.mesh import ParallelDims


@dataclass(frozen=True)
class Plan:
    dims: ParallelDims  # pp x dp_replicate x dp_shard (ep borrowed from dp_shard) for this world
    ac_mode: AcMode
    micro_batch_size: int  # sequences per forward on one data-parallel rank
    grad_accumulation: int  # micro batches per optimizer step on each data-parallel rank
    pp_microbatches: int  # pieces each micro batch is split into under pipeline parallel (1 without)
    pp_stages_per_rank: int  # pipeline stages each rank holds (1 without pipeline parallel)
    reshard_after_forward: bool  # FSDP2: free gathered parameters after each forward
    folder: RunFolder  # where the run's metrics, plot, checkpoints and recipe copy go
    ac_budget: BudgetPlan | None = None  # ac_mode "budget": each decoder layer's mode, and the predicted peak

    @property
    def pipeline_microbatch_size(self) -> int:
        """Sequences in one pipeline microbatch."""
        return self.micro_batch_size // self.pp_microbatches


def resolved_recipe(cfg: Config, plan: Plan) -> dict[str, Any]:
    """The recipe with every default the plan resolved written out: running it again gives the
    same run on the same world size."""
    recipe = cfg.to_dict()
    recipe["run"].update(name=plan.folder.name, dir=plan.folder.dir)
    recipe["train"]["metrics_file"] = plan.folder.metrics_file
    recipe["checkpoint"]["dir"] = plan.folder.checkpoint_dir
    recipe["ac"]["mode"] = plan.ac_mode
    recipe["parallel"].update(dp_shard=plan.dims.dp_shard, reshard_after_forward=plan.reshard_after_forward)
    if plan.dims.pp > 1:
        recipe["parallel"].update(pp_microbatches=plan.pp_microbatches, pp_stages_per_rank=plan.pp_stages_per_rank)
    return recipe
