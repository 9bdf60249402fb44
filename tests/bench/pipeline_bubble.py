"""Pipeline bubble on CPU gloo ranks: `python -m tests.bench.pipeline_bubble [out.json]`.

For 1F1B and Interleaved1F1B at pp 2 and 4 with 4 and 8 microbatches, each rank times its
schedule steps and, inside them, its compute: every forward and backward of a microbatch chunk
and every loss. The bubble of a rank is the rest of the step, the share spent waiting for peers
(p2p transfers included): 1 - compute / step. The table shows the mean over ranks next to the
textbook (p-1)/(m+p-1), and (p-1)/(v*m+p-1) for v stages per rank. Ranks run one thread each;
with more ranks than free cores a rank also waits for a core, which shows up in both terms.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.pipelining.stage import _PipelineStageBase

from harness.loss import count_tokens, token_loss_sum
from harness.materialize import materialize
from harness.models import build_meta_model, load_config, reference_model
from harness.pipeline_stage import stage_builder
from parallel.mesh import ParallelDims
from parallel.pipeline import pipeline_model
from tests.multiproc import run_ranks
from tests.bench.results import write_results

MODEL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_hidden_layers=8)
MICROBATCH_ROWS, SEQ, WARMUP, STEPS = 2, 128, 2, 5
LAYOUTS = [(schedule, pp, m) for schedule in ("1F1B", "Interleaved1F1B") for pp in (2, 4) for m in (4, 8)]
# The schedules expose no per-chunk timing hook, so the bench wraps the methods that compute.
_COMPUTE = [(_PipelineStageBase, "forward_one_chunk"), (_PipelineStageBase, "backward_one_chunk"),
            (_PipelineSchedule, "_compute_loss")]


@contextmanager
def _compute_timer(seconds: list[float]):
    """Adds the wall time of every compute call on this rank to seconds[0]."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in _COMPUTE]

    def timed(method):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - started
        return wrapper

    for owner, name, method in originals:
        setattr(owner, name, timed(method))
    try:
        yield
    finally:
        for owner, name, method in originals:
            setattr(owner, name, method)


def _measure(rank: int, world: int, schedule: str, m: int) -> dict:
    config = load_config("llama", None, MODEL)
    reference = reference_model(config, seed=0)
    meshes = ParallelDims(pp=world, dp_shard=1, world_size=world).build_meshes("cpu")
    tokens = count_tokens(torch.ones(m * MICROBATCH_ROWS, SEQ))

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, labels) / tokens

    plan = pipeline_model(stage_builder(build_meta_model(config)), config.num_hidden_layers, meshes.pp,
                          schedule=schedule, n_microbatches=m, stages_per_rank=None, layers_per_stage=None,
                          parallelize_fn=lambda stage: materialize(stage, reference, "cpu"),
                          device="cpu", loss_fn=loss_fn, microbatch_shape=(MICROBATCH_ROWS, SEQ))
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, config.vocab_size, (m * MICROBATCH_ROWS, SEQ), generator=gen)
    labels = torch.randint(0, config.vocab_size, (m * MICROBATCH_ROWS, SEQ), generator=gen)
    steps, bubbles = [], []
    for step in range(WARMUP + STEPS):
        compute = [0.0]
        torch.distributed.barrier()
        with _compute_timer(compute):
            started = time.perf_counter()
            plan.step(inputs, labels)
            elapsed = time.perf_counter() - started
        for module in plan.stage_modules:
            module.zero_grad(set_to_none=True)
        if step >= WARMUP:
            steps.append(elapsed)
            bubbles.append(1 - compute[0] / elapsed)
    return dict(rank=rank, step_s=statistics.median(steps), bubble=statistics.median(bubbles))


def main(out_path: str) -> None:
    rows = []
    for schedule, pp, m in LAYOUTS:
        per_rank = run_ranks(_measure, pp, schedule, m)
        v = 1 if schedule == "1F1B" else 2
        rows.append(dict(schedule=schedule, pp=pp, microbatches=m, stages_per_rank=v,
                         step_s=max(r["step_s"] for r in per_rank),
                         bubble_mean=statistics.mean(r["bubble"] for r in per_rank),
                         bubble_per_rank=[round(r["bubble"], 4) for r in per_rank],
                         textbook=(pp - 1) / (m + pp - 1), textbook_interleaved=(pp - 1) / (v * m + pp - 1)))
    print(f"{'schedule':<16}{'pp':>3}{'m':>3}{'step s':>9}{'bubble':>8}{'(p-1)/(m+p-1)':>15}"
          f"{'(p-1)/(vm+p-1)':>16}  per rank")
    for r in rows:
        print(f"{r['schedule']:<16}{r['pp']:>3}{r['microbatches']:>3}{r['step_s']:>9.3f}{r['bubble_mean']:>8.3f}"
              f"{r['textbook']:>15.3f}{r['textbook_interleaved']:>16.3f}  {r['bubble_per_rank']}")
    write_results(out_path, dict(model=MODEL, microbatch_rows=MICROBATCH_ROWS, seq=SEQ, steps=STEPS,
                                 cpu_count=os.cpu_count(), results=rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench_pipeline_bubble.json")
