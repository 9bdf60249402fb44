"""Harness benchmarks on CPU gloo ranks: `python -m harness.bench [--steps N] [--out runs/bench.json]`.

Three tables, on the llama preset widened to hidden 128 (0.66M parameters), seq 128, global
batch 8, one forward per step on each rank, one CPU thread per rank:

- overhead: the harness's step (`build_run` + `train_step` on a 1-rank group: FSDP2 hooks, the
  token and loss all-reduces, gradient clipping, the LR schedule) against a plain loop on the
  same HF model and batches (forward, backward, AdamW step). Both run in one process, taking
  turns step by step, so load from other processes hits both alike.
- memory: the bytes each rank holds of parameters, gradients and AdamW moments (the local
  shards, `to_local()`) at dp_shard = 1, 2, 4, against the single-process total / N.
- throughput: tokens/s of dp_shard=2 against one process on the same global batch, with each
  rank's CPU seconds per step: far below the step time, the rank was waiting for a core or a peer.

Times are medians after one warm-up step; on a shared machine they move with its load.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from harness.config import Config, load_config
from harness.data import BatchSampler, load_tokens
from harness.loss import count_tokens, token_loss_sum
from harness.models import load_config as load_model_config, reference_model
from harness.trainer import Run, build_run, train_step
from harness.validation import validate

GLOBAL_BATCH = 8
MEMORY_SHARDS = (1, 2, 4)
THROUGHPUT_SHARDS = (1, 2)


def bench_config(dp_shard: int, steps: int) -> Config:
    """The benchmark recipe for `dp_shard` ranks: each rank runs its share of the batch in one forward."""
    return load_config(None, [
        "--model.preset=llama", "--model.overrides.hidden_size=128", "--model.overrides.head_dim=32",
        "--model.overrides.intermediate_size=256", f"--train.steps={steps}",
        f"--train.global_batch_size={GLOBAL_BATCH}", f"--train.micro_batch_size={GLOBAL_BATCH // dp_shard}",
        "--train.seq_len=128", "--train.warmup_steps=1", "--train.metrics_file=null",
        "--data.max_bytes=400000", "--logging.progress=false", f"--parallel.dp_shard={dp_shard}"])


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def shard_bytes(run: Run) -> dict[str, int]:
    """Bytes of this rank's parameter, gradient and AdamW exp_avg/exp_avg_sq shards."""
    params = [p for m in run.modules for p in m.parameters()]
    states = [run.optimizer.state[p] for p in params if p in run.optimizer.state]
    return dict(params=sum(_local_bytes(p) for p in params),
                grads=sum(_local_bytes(p.grad) for p in params if p.grad is not None),
                optimizer=sum(_local_bytes(s[key]) for s in states for key in ("exp_avg", "exp_avg_sq")))


def _fill_gradients(run: Run) -> None:
    """One forward/backward without a step: train_step frees gradients, the memory count needs them."""
    group = run.dp_group
    inputs, labels = run.sampler.local_batch(run.step, dist.get_rank(group), dist.get_world_size(group))
    micro = run.cfg.train.micro_batch_size
    run.forward_backward(inputs[:micro], labels[:micro])


def layout_rank(rank: int, world: int, steps: int) -> dict[str, Any]:
    """On one rank of a dp_shard=`world` run: step times of `steps` steps, then its shard bytes."""
    cfg = bench_config(world, steps)
    run = build_run(cfg, validate(cfg, world))
    rows, cpu_s = [], []
    for _ in range(steps):
        # CPU time next to wall time tells a rank that waited for a core from one that worked.
        start = time.process_time()
        rows.append(train_step(run))
        cpu_s.append(time.process_time() - start)
    _fill_gradients(run)
    return dict(step_s=[r["step_time_s"] for r in rows], cpu_s=cpu_s, tokens=rows[-1]["tokens"], **shard_bytes(run))


def _rank_entry(rank: int, world: int, store: str, results: str, fn: Callable, args: tuple) -> None:
    # One thread per rank: N ranks then use N cores, as N GPUs would be N devices.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        value = fn(rank, world, *args)
        with open(os.path.join(results, f"{rank}.pkl"), "wb") as f:
            pickle.dump(value, f)
        dist.barrier()  # gloo was seen aborting at teardown while a peer was still in a collective
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable, world: int, *args: Any) -> list[Any]:
    """`fn(rank, world, *args)` on `world` gloo ranks in fresh processes; their results by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_entry, args=(world, os.path.join(tmp, "store"), tmp, fn, args), nprocs=world)
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results


def _median_of_slowest(per_rank: list[list[float]]) -> float:
    # A step ends when its slowest rank's does; the first step is warm-up.
    return statistics.median(max(step) for step in list(zip(*per_rank))[1:])


def layout(world: int, steps: int) -> dict[str, Any]:
    """Per-rank shard bytes (max and min over ranks) and tokens/s of a dp_shard=`world` run."""
    ranks = spawn_ranks(layout_rank, world, steps)
    row: dict[str, Any] = dict(dp_shard=world, step_s=None, cpu_s=None, tokens_per_s=None)
    if steps > 1:
        row["step_s"] = _median_of_slowest([r["step_s"] for r in ranks])
        row["cpu_s"] = _median_of_slowest([r["cpu_s"] for r in ranks])
        row["tokens_per_s"] = ranks[0]["tokens"] / row["step_s"]
    for key in ("params", "grads", "optimizer"):
        row[f"{key}_bytes_max"] = max(r[key] for r in ranks)
        row[f"{key}_bytes_min"] = min(r[key] for r in ranks)
    return row


def overhead(steps: int) -> dict[str, Any]:
    """Median step time of the harness on a 1-rank group against a plain loop, in this process."""
    torch.set_num_threads(1)
    cfg = bench_config(1, steps)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        try:
            run = build_run(cfg, validate(cfg, 1))
            t = cfg.train
            model = reference_model(load_model_config(cfg.model.preset, cfg.model.path, cfg.model.overrides), t.seed)
            optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay)
            sampler = BatchSampler(load_tokens(cfg.data), t.seq_len, t.global_batch_size, t.seed)
            plain, harness = [], []
            for step in range(steps):
                start = time.perf_counter()
                inputs, labels = sampler.global_batch(step)
                loss = token_loss_sum(model(input_ids=inputs).logits, labels) / count_tokens(labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                plain.append(time.perf_counter() - start)
                start = time.perf_counter()
                train_step(run)
                harness.append(time.perf_counter() - start)
        finally:
            dist.destroy_process_group()
    plain_s, harness_s = statistics.median(plain[1:]), statistics.median(harness[1:])
    return dict(plain_ms=plain_s * 1e3, harness_ms=harness_s * 1e3, overhead_pct=100 * (harness_s / plain_s - 1))


def format_tables(over: dict[str, Any], layouts: list[dict[str, Any]]) -> str:
    lines = ["step time, 1 process (median ms)",
             f"{'plain loop':>12} {'harness':>9} {'overhead':>9}",
             f"{over['plain_ms']:>12.1f} {over['harness_ms']:>9.1f} {over['overhead_pct']:>8.1f}%",
             "",
             "bytes per rank (max over ranks) vs single-process total / N",
             f"{'dp_shard':>8} {'params':>10} {'grads':>10} {'adamw':>10} {'sum':>10} {'total/N':>10} {'x total/N':>9}"]
    base = layouts[0]
    total = sum(base[f"{k}_bytes_max"] for k in ("params", "grads", "optimizer"))
    for r in layouts:
        per_rank = sum(r[f"{k}_bytes_max"] for k in ("params", "grads", "optimizer"))
        n = r["dp_shard"]
        lines.append(f"{n:>8} {r['params_bytes_max']:>10,} {r['grads_bytes_max']:>10,} "
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
    parser.add_argument("--out", default=os.path.join("runs", "bench.json"))
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
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(config=vars(args), load_average=[load[0], os.getloadavg()[0]], overhead=over,
                       layouts=layouts), f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
