"""The layout planner against real runs: per-rank peak memory and step-time ranking on gloo CPU.

    nice -n 10 python -m tests.bench.planner [--families dense moe hybrid] [--out runs/bench_planner.json] [--predict-only]

For a dense (Llama), an MoE (Qwen3-MoE) and a hybrid (LFM2: convolution and attention layers)
model of a few tens of millions of parameters, each layout runs 4 steps for real on 2 gloo ranks
(one core each) and is predicted by the planner for the same recipe (harness/layout_planner,
device `cpu` with this machine's own figures as inputs: one core's matmul GFLOP/s and the
ranks' gloo all-gather bandwidth, both measured first).

Memory: parameter and AdamW bytes (after a step gradients are freed) against the prediction's
exact shard shapes; the worst rank's RSS growth over the RSS before `build_run`, at its peak over the build
and the steps (as tests/bench/load_bench.py measures it), against the prediction plus the
process's own growth, measured once as the growth of the same run with a near-empty model
(the token array, gloo's buffers, allocator arenas, kernels' workspaces: none of it the model's).
Time: the fastest step after the first (the box is shared: other work only ever slows a step),
against the predicted step time; the Spearman rank correlation over each family's layouts.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from transformers import AutoConfig

from harness.config import load_config
from harness.layout_planner.devices import named_device, with_overrides
from harness.layout_planner.plan_check import predict_run
from harness.validation import validate
from tests.bench.planner_runs import measure_layout
from tests.bench.results import write_results

WORLD = 2
MiB = 2**20
_ATTENTION = dict(hidden_size=384, num_attention_heads=6, num_key_value_heads=2, head_dim=64, num_hidden_layers=8,
                  vocab_size=4000, max_position_embeddings=512, tie_word_embeddings=False)
FAMILIES = {
    "dense": dict(model_type="llama", intermediate_size=1024, **_ATTENTION),
    "moe": dict(model_type="qwen3_moe", intermediate_size=1024, moe_intermediate_size=256, num_experts=8,
                num_experts_per_tok=2, norm_topk_prob=True, **_ATTENTION),
    "hybrid": dict(model_type="lfm2", intermediate_size=1024, block_ff_dim=1024, block_auto_adjust_ff_dim=False,
                   layer_types=["conv", "full_attention"] * 4, **_ATTENTION),
}
EMPTY = dict(model_type="llama", intermediate_size=32, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, num_hidden_layers=2, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False)
LAYOUTS = {
    "fsdp2": ["--parallel.dp_shard=2"],
    "fsdp2 selective": ["--parallel.dp_shard=2", "--ac.mode=selective"],
    "fsdp2 full": ["--parallel.dp_shard=2", "--ac.mode=full"],
    "fsdp2 micro batch 1": ["--parallel.dp_shard=2", "--train.micro_batch_size=1"],
    "dp_replicate2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"],
    "pp2 1F1B/2": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=2"],
    "pp2 1F1B/4": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_microbatches=4"],
    "pp2 GPipe/4": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=GPipe",
                    "--parallel.pp_microbatches=4"],
    "pp2 Interleaved1F1B/2": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.pp_schedule=Interleaved1F1B",
                              "--parallel.pp_microbatches=2"],
    "fsdp2 ep2": ["--parallel.dp_shard=2", "--parallel.ep=2"],
    "tp2": ["--parallel.dp_shard=1", "--parallel.tp=2"],
    "cp2": ["--parallel.dp_shard=1", "--parallel.cp=2"],
}
COMMON = ["--train.seq_len=256", "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.steps=4",
          "--train.metrics_file=null", "--logging.progress=false", "--data.max_bytes=300000"]


def _core_gflops() -> float:
    """One thread's fp32 matmul rate on this machine."""
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    started, runs = time.perf_counter(), 20
    for _ in range(runs):
        a @ b
    return 2 * 1024**3 * runs / (time.perf_counter() - started) / 1e9


def _gather_GBps(rank: int, world_size: int) -> float:
    """Per-rank bus bandwidth of a 64 MiB gloo all-gather."""
    import torch.distributed as dist

    chunk = torch.zeros(8 * MiB // world_size)
    out = torch.empty(8 * MiB)
    dist.all_gather_into_tensor(out, chunk)
    started = time.perf_counter()
    for _ in range(3):
        dist.all_gather_into_tensor(out, chunk)
    return 3 * out.numel() * 4 * (world_size - 1) / world_size / (time.perf_counter() - started) / 1e9


def _config_path(directory: str, name: str, values: dict) -> str:
    values = dict(values)
    path = os.path.join(directory, name)
    AutoConfig.for_model(values.pop("model_type"), **values).save_pretrained(path)
    return os.path.join(path, "config.json")


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for position, index in enumerate(order):
            out[index] = float(position)
        return out

    rx, ry = ranks(xs), ranks(ys)
    mean = (len(xs) - 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    var = sum((a - mean) ** 2 for a in rx)
    return cov / var


def _predicted(row: dict, cfg, device) -> dict:
    """`row` with the planner's prediction for its recipe."""
    predicted = predict_run(cfg, validate(cfg, WORLD), WORLD, WORLD, device)
    return {**row, "predicted_bytes": predicted.peak_bytes,
            "predicted_state_bytes": predicted.state.param + predicted.state.optimizer,
            "predicted_step_s": predicted.step_s}


def _recipe(path: str, name: str):
    return load_config(None, [f"--model.path={path}", *COMMON, *LAYOUTS[name]])


def main() -> None:
    from tests.multiproc import run_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--out", default="runs/bench_planner.json")
    parser.add_argument("--predict-only", action="store_true",
                        help="predict again the runs measured in --out (the planner changed, the runs did not)")
    args = parser.parse_args()
    if args.predict_only:
        with open(args.out) as f:
            results = json.load(f)
        gflops, bandwidth, process_growth = results["gflops_per_core"], results["gloo_GBps"], \
            results["process_growth_bytes"]
    else:
        # A fixed, low mmap threshold: glibc's default one rises with each large free, and below it
        # freed tensors stay in the heap, where the RSS peak counts them as if alive (at 1 MiB the
        # activations of a one-sequence micro batch, 384 KiB each, read 14% above their live bytes).
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 2**10)
        gflops = _core_gflops()
        bandwidth = min(run_ranks(_gather_GBps, WORLD))
    device = with_overrides(named_device("cpu"), peak_tflops=gflops / 1000, intra_node_GBps=bandwidth,
                            inter_node_GBps=bandwidth, efficiency=1.0)
    print(f"this machine: {gflops:.0f} GFLOP/s per core (fp32 matmul), gloo all-gather {bandwidth:.2f} GB/s per rank",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        paths = {family: _config_path(directory, family, FAMILIES[family]) for family in args.families}
        if args.predict_only:
            rows = [_predicted(row, _recipe(paths[row["family"]], row["layout"]), device)
                    for row in results["rows"] if row["family"] in paths]
        else:
            empty = load_config(None, [f"--model.path={_config_path(directory, 'empty', EMPTY)}",
                                       "--parallel.dp_shard=2", *COMMON])
            process_growth = max(r["peak_growth"] for r in run_ranks(measure_layout, WORLD, empty, timeout=1800))
            print(f"process growth with a near-empty model: {process_growth / MiB:.0f} MiB", flush=True)
        for family in [] if args.predict_only else args.families:
            for name in args.layouts:
                cfg = _recipe(paths[family], name)
                try:
                    validate(cfg, WORLD)
                except ValueError as e:
                    print(f"{family:>6} | {name:>22} | refused: {e}", flush=True)
                    continue
                per_rank = run_ranks(measure_layout, WORLD, cfg, timeout=1800)
                row = _predicted({"family": family, "layout": name,
                                  "measured_state_bytes": max(r["state_bytes"] for r in per_rank),
                                  "process_growth_bytes": process_growth,
                                  "measured_growth_bytes": max(r["peak_growth"] for r in per_rank),
                                  "measured_step_s": max(r["step_s"] for r in per_rank)}, cfg, device)
                rows.append(row)
                print(_format(row), flush=True)
    print()
    print("| family | layout | predicted state MiB | measured state MiB | predicted peak MiB | + process | "
          "measured RSS growth MiB | error | predicted step s | measured step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['layout']} | {row['predicted_state_bytes'] / MiB:.1f} | "
              f"{row['measured_state_bytes'] / MiB:.1f} | {row['predicted_bytes'] / MiB:.0f} | "
              f"{(row['predicted_bytes'] + process_growth) / MiB:.0f} | {row['measured_growth_bytes'] / MiB:.0f} | "
              f"{_error(row):+.1%} | {row['predicted_step_s']:.2f} | {row['measured_step_s']:.2f} |")
    errors = [abs(_error(row)) for row in rows]
    print(f"\nmemory: mean |error| {sum(errors) / len(errors):.1%}, worst {max(errors):.1%} over {len(rows)} runs")
    for family in args.families:
        timed = [row for row in rows if row["family"] == family]
        if len(timed) >= 3:
            rho = _spearman([r["predicted_step_s"] for r in timed], [r["measured_step_s"] for r in timed])
            print(f"step time, {family}: Spearman rank correlation {rho:.2f} over {len(timed)} layouts")
    write_results(args.out, {"gflops_per_core": gflops, "gloo_GBps": bandwidth, "process_growth_bytes": process_growth,
                             "rows": rows})


def _error(row: dict) -> float:
    predicted = row["predicted_bytes"] + row["process_growth_bytes"]
    return (predicted - row["measured_growth_bytes"]) / row["measured_growth_bytes"]


def _format(row: dict) -> str:
    return (f"{row['family']:>6} | {row['layout']:>22} | state {row['predicted_state_bytes'] / MiB:.1f} / "
            f"{row['measured_state_bytes'] / MiB:.1f} MiB | peak {(row['predicted_bytes'] + row['process_growth_bytes']) / MiB:.0f}"
            f" / {row['measured_growth_bytes'] / MiB:.0f} MiB ({_error(row):+.1%}) | step {row['predicted_step_s']:.2f} / "
            f"{row['measured_step_s']:.2f} s")


if __name__ == "__main__":
    main()
