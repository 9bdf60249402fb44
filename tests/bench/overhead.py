"""Harness overhead, FSDP2 memory and data-parallel throughput on CPU gloo ranks.

    python -m tests.bench.overhead [--steps N] [--out runs/bench_overhead.json]

Three tables, on the llama preset widened to hidden 128 (0.66M parameters), seq 128, global
batch 8, one forward per step on each rank, one CPU thread per rank:

- overhead: the harness's step (`build_run` and the training loop's steps on a 1-rank group:
  the token-count all-reduce before each step, the one of its metrics after its backward,
  rows written on logging steps) against the one-process reference step of the tests
  (`tests.reference.reference_step`: forward, backward, clipping, AdamW) on the same HF model and
  batches, LR schedule included. Both run in one process, taking turns step by step, so load
  from other processes hits both alike.
- memory: the bytes each rank holds of parameters, gradients and AdamW moments (the local
  shards, counted by `harness.memory.state_bytes`) at dp_shard = 1, 2, 4, against the
  single-process total / N.
- throughput: tokens/s of dp_shard=2 against one process on the same global batch, with each
  rank's CPU seconds per step: far below the step time, the rank was waiting for a core or a peer.

Times are medians after one warm-up step; on a shared machine they move with its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from harness.config import Config, load_config
from harness.data import BatchSampler, load_tokens
from harness.memory import state_bytes
from harness.models import load_config as load_model_config, reference_model
from harness.schedule import lr_factor
from harness.metrics import MetricsLog
from harness.trainer import Run, agree_on_step, build_run, metrics_rows, run_step, train_step
from harness.validation import validate
from tests.multiproc import run_ranks
from tests.reference import reference_optimizer, reference_step
from tests.bench.results import write_results

GLOBAL_BATCH = 8
MEMORY_SHARDS = (1, 2, 4)
THROUGHPUT_SHARDS = (1, 2)
STATE = ("param", "grad", "optimizer")


def bench_config(dp_shard: int, steps: int) -> Config:
    """The benchmark recipe for `dp_shard` ranks: each rank runs its share of the batch in one forward."""
    return load_config(None, [
        "--run.name=bench_overhead", "--model.preset=llama", "--model.overrides.hidden_size=128",
        "--model.overrides.head_dim=32", "--model.overrides.intermediate_size=256", f"--train.steps={steps}",
        f"--train.global_batch_size={GLOBAL_BATCH}", f"--train.micro_batch_size={GLOBAL_BATCH // dp_shard}",
        "--train.seq_len=128", "--train.warmup_steps=1", "--train.metrics_file=null",
        "--data.max_bytes=400000", "--logging.progress=false", f"--parallel.dp_shard={dp_shard}"])


def _fill_gradients(run: Run) -> None:
    """One forward/backward without a step: train_step frees gradients, the memory count needs them."""
    group = run.dp_group
    inputs, labels = run.sampler.local_batch(run.step, dist.get_rank(group), dist.get_world_size(group))
    micro = run.cfg.train.micro_batch_size
    run.forward_backward(inputs[:micro], labels[:micro])


def layout_rank(rank: int, world: int, steps: int) -> dict[str, Any]:
    """On one rank of a dp_shard=`world` run: step times of `steps` steps, then its state bytes."""
    cfg = bench_config(world, steps)
    run = build_run(cfg, validate(cfg, world))
    rows, cpu_s = [], []
    for _ in range(steps):
        # CPU time next to wall time tells a rank that waited for a core from one that worked.
        start = time.process_time()
        rows.append(train_step(run))
        cpu_s.append(time.process_time() - start)
    _fill_gradients(run)
    params = [p for m in run.modules for p in m.parameters()]
    return dict(step_s=[r["step_time_s"] for r in rows], cpu_s=cpu_s, tokens=rows[-1]["tokens"],
                **state_bytes(params, run.optimizer))


def _median_of_slowest(per_rank: list[list[float]]) -> float:
    # A step ends when its slowest rank's does; the first step is warm-up.
    return statistics.median(max(step) for step in list(zip(*per_rank))[1:])


def layout(world: int, steps: int) -> dict[str, Any]:
    """Per-rank state bytes (max and min over ranks) and tokens/s of a dp_shard=`world` run."""
    ranks = run_ranks(layout_rank, world, steps)
    row: dict[str, Any] = dict(dp_shard=world, step_s=None, cpu_s=None, tokens_per_s=None)
    if steps > 1:
        row["step_s"] = _median_of_slowest([r["step_s"] for r in ranks])
        row["cpu_s"] = _median_of_slowest([r["cpu_s"] for r in ranks])
        row["tokens_per_s"] = ranks[0]["tokens"] / row["step_s"]
    for key in STATE:
        row[f"{key}_bytes_max"] = max(r[key] for r in ranks)
        row[f"{key}_bytes_min"] = min(r[key] for r in ranks)
    return row


def overhead(steps: int) -> dict[str, Any]:
    """Median step time of the harness on a 1-rank group against the reference step, in this process."""
    torch.set_num_threads(1)
    cfg = bench_config(1, steps)
    t = cfg.train
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            run = build_run(cfg, validate(cfg, 1))
            model = reference_model(load_model_config(cfg.model.preset, cfg.model.path, cfg.model.overrides), t.seed)
            optimizer = reference_optimizer(model, cfg)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))
            sampler = BatchSampler(load_tokens(cfg.data), t.seq_len, t.global_batch_size, t.seed)
            reference, harness = [], []
            log = MetricsLog(None, steps, cfg.logging.log_every, progress=False, enabled=False)
            wants_row, pending, window_start = log.wants_row, [], time.perf_counter()
            for step in range(steps):
                start = time.perf_counter()
                reference_step(model, optimizer, *sampler.global_batch(step), t.max_grad_norm)
                scheduler.step()
                reference.append(time.perf_counter() - start)
                start = time.perf_counter()
                agree_on_step(run)
                pending.append(run_step(run)[0])
                if wants_row(run.step):  # the training loop's cadence: rows written on logging steps
                    metrics_rows(run, pending, time.perf_counter() - window_start)
                    pending, window_start = [], time.perf_counter()
                harness.append(time.perf_counter() - start)
        finally:
            dist.destroy_process_group()
    reference_s, harness_s = statistics.median(reference[1:]), statistics.median(harness[1:])
    # The mean counts the logging steps' read-back, which the median leaves out.
    reference_mean, harness_mean = statistics.mean(reference[1:]), statistics.mean(harness[1:])
    return dict(reference_ms=reference_s * 1e3, harness_ms=harness_s * 1e3, ratio=harness_s / reference_s,
                overhead_pct=100 * (harness_s / reference_s - 1), reference_mean_ms=reference_mean * 1e3,
                harness_mean_ms=harness_mean * 1e3, mean_ratio=harness_mean / reference_mean)


def format_tables(over: dict[str, Any], layouts: list[dict[str, Any]]) -> str:
    lines = ["step time, 1 process (ms; mean includes the logging steps)",
             f"{'':>8} {'plain':>9} {'harness':>9} {'x plain':>8}",
             f"{'median':>8} {over['reference_ms']:>9.1f} {over['harness_ms']:>9.1f} {over['ratio']:>8.3f}",
             f"{'mean':>8} {over['reference_mean_ms']:>9.1f} {over['harness_mean_ms']:>9.1f} {over['mean_ratio']:>8.3f}",
             "",
             "bytes per rank (max over ranks) vs single-process total / N",
             f"{'dp_shard':>8} {'params':>10} {'grads':>10} {'adamw':>10} {'sum':>10} {'total/N':>10} {'x total/N':>9}"]
    base = layouts[0]
    total = sum(base[f"{k}_bytes_max"] for k in STATE)
    for r in layouts:
        per_rank = sum(r[f"{k}_bytes_max"] for k in STATE)
        n = r["dp_shard"]
        lines.append(f"{n:>8} {r['param_bytes_max']:>10,} {r['grad_bytes_max']:>10,} "
                     f"{r['optimizer_bytes_max']:>10,} {per_rank:>10,} {total // n:>10,} {per_rank * n / total:>9.3f}")
    lines += ["", "throughput, same global batch",
              f"{'dp_shard':>8} {'step ms':>9} {'cpu ms':>8} {'tokens/s':>10} {'x 1 proc':>9}"]
    timed = [r for r in layouts if r["dp_shard"] in THROUGHPUT_SHARDS]
    for r in timed:
        lines.append(f"{r['dp_shard']:>8} {r['step_s'] * 1e3:>9.1f} {r['cpu_s'] * 1e3:>8.1f} "
                     f"{r['tokens_per_s']:>10,.0f} {r['tokens_per_s'] / timed[0]['tokens_per_s']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run, the first one warm-up")
    parser.add_argument("--out", default=os.path.join("runs", "bench_overhead.json"))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is warm-up")

    load = os.getloadavg()
    over = overhead(args.steps)
    # Memory needs one optimizer step; layouts not in the throughput table are not timed.
    layouts = [layout(n, args.steps if n in THROUGHPUT_SHARDS else 1) for n in MEMORY_SHARDS]
    print(f"llama hidden 128, seq 128, global batch {GLOBAL_BATCH}, 1 thread per rank, "
          f"load average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(format_tables(over, layouts))
    write_results(args.out, dict(config=vars(args), load_average=[load[0], os.getloadavg()[0]], overhead=over,
                                 layouts=layouts))


if __name__ == "__main__":
    main()
