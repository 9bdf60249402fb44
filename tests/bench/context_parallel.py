"""Context parallel: per-rank activation memory and step time by sequence length and cp, and the
attention work per rank of the head-tail split against a contiguous one.

    python -m tests.bench.context_parallel [--seqs 4096 8192 16384] [--cps 1 2 4] [--hidden 64 --layers 2]
                                           [--rotations allgather ring] [--out runs/bench/context_parallel.json]

Each (seq, cp, rotation) runs on cp gloo ranks of this machine: the HF Llama preset widened to
`--hidden`, one sequence per step, each rank its head-tail share of it through the
context-parallel attention (parallel/cp_attention.py), its keys and values all-gathered or
passed around the ring (`parallel.cp_rotate`). Activation memory is MemTracker's peak less parameters, gradients and
buffers (as tests/bench/ac_report.py measures it), the largest over ranks; step time (forward and
backward) the median of `--steps` steps after one warm-up, the slowest rank's.

The balance table times, in one process, the causal attention each rank of a cp group would run
(its queries against the keys before them): the head-tail split (chunks r and 2cp-1-r of 2cp)
against a contiguous split (chunk r of cp), as the slowest rank over the mean.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from torch.nn.attention.bias import causal_lower_right

from harness.loss import token_loss_sum
from harness.memory import MiB
from harness.models import load_config, reference_model
from parallel.context_parallel import ROTATIONS, SequenceShard, head_tail_index
from parallel.cp_attention import use_context_parallel_attention
from tests.bench.ac_report import _STATE_CATEGORIES, _scaled_overrides
from tests.bench.results import write_results
from tests.multiproc import run_ranks


def _step(model: torch.nn.Module, shard: SequenceShard | None, input_ids: torch.Tensor) -> None:
    inputs, labels = input_ids[:, :-1], input_ids[:, 1:]
    extra = {}
    if shard is not None:
        inputs, labels = shard.split(inputs), shard.split(labels)
        extra = shard.model_inputs(1, None, inputs.device)
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model(input_ids=inputs, use_cache=False, **extra).logits, labels) / input_ids.shape[1]
    loss.backward()


def _rank(rank: int, world_size: int, hidden: int, layers: int, seq: int, steps: int,
          rotation: str) -> dict[str, float]:
    config = load_config("llama", None, _scaled_overrides("llama", hidden, layers, seq))
    model = reference_model(config, seed=0)
    shard = SequenceShard(dist.group.WORLD, seq, rotation) if world_size > 1 else None
    if shard is not None:
        use_context_parallel_attention(model, shard)
    input_ids = torch.randint(0, config.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    _step(model, shard, input_ids)  # warm-up
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        _step(model, shard, input_ids)
        times.append(time.perf_counter() - start)
    tracker = MemTracker()
    tracker.track_external(model, input_ids)
    with tracker:
        _step(model, shard, input_ids)
    peaks = tracker.get_tracker_snapshot("peak")
    activation = max(snap["Total"] - sum(snap.get(key, 0) for key in _STATE_CATEGORIES) for snap in peaks.values())
    return {"activation_mib": activation / MiB, "step_s": statistics.median(times)}


def memory_and_time(seqs: list[int], cps: list[int], rotations: list[str], hidden: int, layers: int,
                    steps: int) -> list[dict[str, Any]]:
    rows = []
    for seq in seqs:
        base = None
        for cp, rotation in [(cp, rotation) for cp in cps for rotation in (rotations if cp > 1 else ["-"])]:
            per_rank = run_ranks(_rank, cp, hidden, layers, seq, steps, rotation, timeout=1800)
            row = dict(seq=seq, cp=cp, rotation=rotation, activation_mib=max(r["activation_mib"] for r in per_rank),
                       step_s=max(r["step_s"] for r in per_rank))
            base = base or row
            row["memory_vs_cp1"] = row["activation_mib"] / base["activation_mib"]
            row["goal"] = 1 / cp * 1.1 if base["cp"] == 1 else None
            rows.append(row)
            print(row, flush=True)
    return rows


def _attention_seconds(query_spans: list[tuple[int, int]], heads: int, head_dim: int, repeats: int) -> float:
    """Fastest of `repeats` timings of causal attention for the queries of `query_spans` [start, end)
    against the keys before them (bottom-right aligned), forward and backward."""
    best = float("inf")
    for _ in range(repeats):
        elapsed = 0.0
        for start, end in query_spans:
            q = torch.randn(1, heads, end - start, head_dim, requires_grad=True)
            k = torch.randn(1, heads, end, head_dim, requires_grad=True)
            v = torch.randn(1, heads, end, head_dim, requires_grad=True)
            began = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(end - start, end)).sum().backward()
            elapsed += time.perf_counter() - began
        best = min(best, elapsed)
    return best


def balance(seq: int, cps: list[int], heads: int = 4, head_dim: int = 16, repeats: int = 3) -> list[dict[str, Any]]:
    rows = []
    for cp in (c for c in cps if c > 1):
        chunk = seq // (2 * cp)
        head_tail = [[(int(s), int(s) + chunk) for s in head_tail_index(seq, cp, r)[::chunk]] for r in range(cp)]
        split = {"head-tail": head_tail,
                 "contiguous": [[(r * seq // cp, (r + 1) * seq // cp)] for r in range(cp)]}
        for name, spans in split.items():
            seconds = [_attention_seconds(s, heads, head_dim, repeats) for s in spans]
            rows.append(dict(seq=seq, cp=cp, split=name, per_rank_s=seconds,
                             slowest_over_mean=max(seconds) / statistics.mean(seconds)))
            print(rows[-1], flush=True)
    return rows


def format_tables(memory: list[dict[str, Any]], balanced: list[dict[str, Any]]) -> str:
    lines = [f"{'seq':>6} {'cp':>3} {'rotate':<10} {'act MiB/rank':>13} {'x cp=1':>7} {'goal':>6} {'step s':>8}"]
    for r in memory:
        goal = f"{r['goal']:.2f}" if r["goal"] else "-"
        lines.append(f"{r['seq']:>6} {r['cp']:>3} {r['rotation']:<10} {r['activation_mib']:>13.1f} "
                     f"{r['memory_vs_cp1']:>7.2f} {goal:>6} {r['step_s']:>8.2f}")
    lines.append("")
    lines.append(f"{'seq':>6} {'cp':>3} {'split':<11} {'attention s per rank':<36} {'slowest/mean':>12}")
    for r in balanced:
        per_rank = " ".join(f"{s:.3f}" for s in r["per_rank_s"])
        lines.append(f"{r['seq']:>6} {r['cp']:>3} {r['split']:<11} {per_rank:<36} {r['slowest_over_mean']:>12.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rotations", nargs="+", choices=ROTATIONS, default=list(ROTATIONS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/context_parallel.json")
    args = parser.parse_args()
    memory = memory_and_time(args.seqs, args.cps, args.rotations, args.hidden, args.layers, args.steps)
    balanced = balance(args.seqs[-1], args.cps)
    print(format_tables(memory, balanced))
    write_results(args.out, {"memory_and_time": memory, "balance": balanced, "args": vars(args)})


if __name__ == "__main__":
    main()
