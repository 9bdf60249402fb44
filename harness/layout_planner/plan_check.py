"""The planner's prediction for the run at hand, and its comparison with what the run measures
(`logging.plan_check`)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from harness.config import Config
from harness.flops import peak_flops_per_rank
from harness.layout_planner.devices import Device, named_device, with_overrides
from harness.layout_planner.layouts import Layout
from harness.layout_planner.planner import model_facts_for
from harness.layout_planner.predict import Prediction, predict
from harness.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from harness.plan import Plan

MiB = 2**20


def run_layout(cfg: Config, plan: Plan) -> Layout:
    dims = plan.dims
    return Layout(pp=dims.pp, dp_replicate=dims.dp_replicate, dp_shard=dims.dp_shard, tp=dims.tp, ep=dims.ep,
                  micro_batch_size=plan.micro_batch_size,
                  pp_schedule=cfg.parallel.pp_schedule if dims.pp > 1 else None,
                  pp_microbatches=plan.pp_microbatches, ac_mode=plan.ac_mode, ac_budget_mib=cfg.ac.budget_mib,
                  cp=dims.cp)


def this_device(peak_tflops: float | None, local_world_size: int) -> Device:
    """The device the run is on: a named GPU when CUDA's name says which, else this rank's share
    of this CPU (as the MFU in the metrics counts it)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        key = next((key for key in ("h200", "h100") if key in name), None)
        if key is None:
            raise ValueError(f"logging.plan_check: no device figures for {torch.cuda.get_device_name()}; "
                             "set logging.plan_check=false")
        device = named_device(key)
        return with_overrides(device, memory=f"{torch.cuda.get_device_properties(0).total_memory}B",
                              peak_tflops=peak_tflops)
    return with_overrides(named_device("cpu"), peak_tflops=peak_flops_per_rank(peak_tflops, local_world_size) / 1e12)


def predict_run(cfg: Config, plan: Plan, world: int, gpus_per_node: int, device: Device) -> Prediction:
    """What the planner predicts for this run's layout on `world` ranks of `device`."""
    facts = model_facts_for(cfg, device, lambda line: None)
    modes = plan.ac_budget.layer_modes if plan.ac_budget is not None else None
    return predict(facts, run_layout(cfg, plan), cfg, world, gpus_per_node, device, layer_modes=modes)


def check_line(prediction: Prediction, measured_peak_bytes: float, measured_step_s: float, what: str) -> str:
    """E.g. 'plan check: peak memory predicted 812 MiB, measured 790 MiB (RSS growth) (+2.8%); ...'."""
    def versus(predicted: float, measured: float) -> str:
        return f"({(predicted - measured) / measured:+.0%})" if measured > 0 else ""

    return (f"plan check: peak memory per rank predicted {prediction.peak_bytes / MiB:.0f} MiB, measured "
            f"{measured_peak_bytes / MiB:.0f} MiB ({what}) {versus(prediction.peak_bytes, measured_peak_bytes)}; "
            f"step time predicted {prediction.step_s:.3g} s, measured {measured_step_s:.3g} s "
            f"{versus(prediction.step_s, measured_step_s)}")


def local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


CHECKED_STEP = 3  # the first steps build kernels' caches and optimizer state; the third runs as the rest will


class PlanCheck:
    """Peak memory of a run from before its build, against the prediction for its layout.

    Measured as the planner predicts it: on CUDA the peak allocated bytes; on CPU the resident
    set's growth over the resident set before the build, at its peak (as tests/bench/planner.py
    measures it), so the process's own libraries are left out.
    """

    def __init__(self, cfg: Config) -> None:
        self.device = this_device(cfg.logging.peak_tflops, local_world())  # an unknown GPU refused at the start
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.before = 0
        else:
            self.before = rss_bytes()
            reset_peak_rss()

    def is_due(self, step: int, first_step: int, last_step: int) -> bool:
        """The third step of this invocation (a resumed run's too), or its last when it runs fewer."""
        return step == min(first_step + CHECKED_STEP - 1, last_step)

    def line(self, cfg: Config, plan: Plan, step_s: float) -> str | None:
        """The check line on rank 0 (None elsewhere), with the worst rank's measured peak: a
        collective, so every rank calls it at the same step."""
        peak = torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes() - self.before
        measured = torch.tensor([float(peak), step_s], dtype=torch.float64, device="cuda" if self.cuda else "cpu")
        dist.all_reduce(measured, op=dist.ReduceOp.MAX)
        if dist.get_rank() != 0:
            return None
        prediction = predict_run(cfg, plan, dist.get_world_size(), local_world(), self.device)
        what = "max allocated" if self.cuda else "RSS growth since the build"
        return check_line(prediction, measured[0].item(), measured[1].item(), what)
