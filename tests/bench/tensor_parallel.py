"""Tensor + sequence parallel on CPU gloo ranks: memory per rank, bytes moved, step time.

    python -m tests.bench.tensor_parallel [--steps N] [--out runs/bench_tensor_parallel.json]

The llama preset widened to hidden 256 (8 heads, 4 KV heads, intermediate 512, 4 layers, vocab
256), seq 256, micro batch 4, no activation checkpointing; the tp ranks of one run train on the
same batch, as they do in any layout. Per tp = 1, 2, 4 (tp=1: the plain model, no DTensor):

- parameters: the bytes of the largest rank's local parameters, against tp=1's (the goal is at
  most 1/tp + 10%: the norms stay replicated);
- activations: the bytes autograd saves for backward in one forward (distinct storages, counted
  by a saved-tensors hook), against tp=1's; sequence parallel shards the norms' and the
  residual stream's, column parallel the heads' and features';
- bytes moved: every collective of forward and backward on one rank (DTensor's functional
  collectives and the vocabulary-parallel loss's all-reduces, seen from a dispatch mode), each
  counted as a ring moves it: an all-gather or reduce-scatter of S bytes moves S (tp-1)/tp, an
  all-reduce twice that; against the minimum of Megatron-style sequence parallel, which per
  block (attention, MLP) all-gathers the input and reduce-scatters the output in forward and
  does the same in backward, per model scatters the embeddings' output and gathers the head's
  input (and back in backward), and for the loss all-reduces three values per token;
- step time: the median over steps after the first of the slowest rank's train_step, against
  tp=1's. On gloo CPU ranks sharing few cores this is a measure of overhead, not of speed-up.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from harness.config import Config, load_config
from harness.loss import token_loss_sum
from harness.trainer import build_run, train_step
from harness.validation import validate
from tests.bench.results import write_results
from tests.multiproc import run_ranks

TP_SIZES = (1, 2, 4)
HIDDEN, LAYERS, SEQ, MICRO_BATCH = 256, 4, 256, 4
FLOAT_BYTES = 4


def bench_config(tp: int, steps: int) -> Config:
    return load_config(None, [
        "--run.name=bench_tensor_parallel", "--model.preset=llama", f"--model.overrides.hidden_size={HIDDEN}",
        "--model.overrides.num_attention_heads=8", "--model.overrides.num_key_value_heads=4",
        "--model.overrides.head_dim=32", "--model.overrides.intermediate_size=512",
        f"--model.overrides.num_hidden_layers={LAYERS}", f"--train.steps={steps}",
        f"--train.global_batch_size={MICRO_BATCH}", f"--train.micro_batch_size={MICRO_BATCH}",
        f"--train.seq_len={SEQ}", "--train.warmup_steps=1", "--train.metrics_file=null",
        "--data.max_bytes=400000", "--logging.progress=false", "--ac.mode=none",
        f"--parallel.tp={tp}", "--parallel.dp_shard=1"])


# Ring cost of each collective per rank, as a multiple of (tp-1)/tp of the bytes it names:
# the all-gather's output, the reduce-scatter's and the all-reduce's input.
_RING_FACTOR = {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1, "all_reduce": 2, "allreduce_": 2}


class CollectiveBytes(TorchDispatchMode):
    """Counts the collectives dispatched while active, and the bytes a ring moves for them on one rank."""

    def __init__(self, tp: int) -> None:
        super().__init__()
        self.tp = tp
        self.calls: Counter = Counter()
        self.bytes = 0.0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = func.__name__.split(".")[0]
        if func.namespace in ("_c10d_functional", "c10d") and kind in _RING_FACTOR:
            sized = out if kind == "all_gather_into_tensor" else args[0]
            tensors = sized if isinstance(sized, (list, tuple)) else [sized]
            size = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            self.calls[kind] += 1
            self.bytes += _RING_FACTOR[kind] * size * (self.tp - 1) / self.tp
        return out


def _saved_activation_bytes(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters left out)."""
    params = {p.to_local().untyped_storage().data_ptr() if isinstance(p, DTensor) else p.untyped_storage().data_ptr()
              for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if local.device.type != "meta":
            storage = local.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = token_loss_sum(model(input_ids=inputs, use_cache=False).logits, labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def _local_bytes(param: torch.Tensor) -> int:
    local = param.to_local() if isinstance(param, DTensor) else param
    return local.numel() * local.element_size()


def rank_measures(rank: int, world: int, steps: int) -> dict[str, Any]:
    cfg = bench_config(world, steps)
    run = build_run(cfg, validate(cfg, world))
    model = run.modules[0]
    inputs, labels = run.sampler.local_batch(0, 0, 1)
    param_bytes = sum(_local_bytes(p) for p in model.parameters())
    activation_bytes = _saved_activation_bytes(model, inputs, labels)
    counter = CollectiveBytes(world)
    with counter:
        loss = token_loss_sum(model(input_ids=inputs, use_cache=False).logits, labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    step_s = [train_step(run)["step_time_s"] for _ in range(steps)]
    return dict(param_bytes=param_bytes, activation_bytes=activation_bytes, moved_bytes=counter.bytes,
                calls=dict(counter.calls), step_s=step_s, tokens=inputs.numel())


def minimum_bytes(tp: int, tokens: int) -> float:
    """Bytes one rank moves per step under Megatron-style sequence parallel (see the module doc)."""
    hidden = tokens * HIDDEN * FLOAT_BYTES
    blocks = 2 * LAYERS
    gathers_and_scatters = 4 * blocks + 4  # per block 2 in forward, 2 in backward; embeddings and head 2 each
    loss = 2 * 3 * tokens * FLOAT_BYTES
    return (gathers_and_scatters * hidden + loss) * (tp - 1) / tp


def measure(steps: int) -> list[dict[str, Any]]:
    rows = []
    for tp in TP_SIZES:
        ranks = run_ranks(rank_measures, tp, steps)
        step_s = statistics.median(max(step) for step in list(zip(*[r["step_s"] for r in ranks]))[1:])
        moved = max(r["moved_bytes"] for r in ranks)
        rows.append(dict(tp=tp, param_bytes=max(r["param_bytes"] for r in ranks),
                         activation_bytes=max(r["activation_bytes"] for r in ranks), moved_bytes=moved,
                         minimum_bytes=minimum_bytes(tp, ranks[0]["tokens"]), calls=ranks[0]["calls"],
                         step_s=step_s))
    base = rows[0]
    for row in rows:
        row["param_ratio"] = row["param_bytes"] / base["param_bytes"]
        row["activation_ratio"] = row["activation_bytes"] / base["activation_bytes"]
        row["step_ratio"] = row["step_s"] / base["step_s"]
        row["moved_vs_minimum"] = row["moved_bytes"] / row["minimum_bytes"] if row["minimum_bytes"] else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| tp | params / rank | vs tp=1 (goal) | saved activations / rank | vs tp=1 (goal) | "
             "TP MiB moved / step | vs minimum | collectives (fwd + bwd) | step ms | vs tp=1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        goal = f"{1 / row['tp'] + 0.1:.2f}" if row["tp"] > 1 else "1"
        moved = f"{row['moved_vs_minimum']:.2f}" if row["moved_vs_minimum"] else "-"
        calls = ", ".join(f"{count} {kind}" for kind, count in sorted(row["calls"].items())) or "-"
        lines.append(f"| {row['tp']} | {row['param_bytes'] / 2**20:.2f} MiB | {row['param_ratio']:.2f} ({goal}) | "
                     f"{row['activation_bytes'] / 2**20:.1f} MiB | {row['activation_ratio']:.2f} ({goal}) | "
                     f"{row['moved_bytes'] / 2**20:.1f} | {moved} | {calls} | {row['step_s'] * 1e3:.0f} | "
                     f"{row['step_ratio']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="runs/bench_tensor_parallel.json")
    args = parser.parse_args(argv)
    rows = measure(args.steps)
    print(table(rows))
    write_results(args.out, rows)


if __name__ == "__main__":
    main()
