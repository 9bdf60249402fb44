"""`python -m launch plan`: rank every layout of a recipe's model on a world of devices.

    python -m launch plan --config R.yaml --world 64 --gpus-per-node 8 --device h100 \
        [--device-memory 80GiB] [--peak-tflops 989] [--intra-node-GBps 360] [--inter-node-GBps 40] \
        [--efficiency 0.5] [--rows 15] [--out best.yaml] [--section.field=value ...]

Nothing is materialised: the model is built on the meta device and its activations are measured
on fake tensors. Bad input (a world no layout fits, memory too small, an unknown device) is one
line naming the smallest requirement, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from harness.config import ConfigError, load_config
from harness.layout_planner.devices import DEVICES, GiB, device_names, named_device, with_overrides
from harness.layout_planner.planner import make_plan
from harness.layout_planner.report import best_recipe, recipe_overrides, table, write_recipe


def _parser() -> argparse.ArgumentParser:
    named = "; ".join(device.describe() for device in DEVICES.values())
    parser = argparse.ArgumentParser(prog="python -m launch plan", description=__doc__.splitlines()[0],
                                     epilog=f"Named devices: {named}; cpu: this machine (its RAM, 50 GFLOP/s a "
                                            "core, gloo over loopback).")
    parser.add_argument("--config", help="the recipe YAML to plan (its model, batch and sequence length)")
    parser.add_argument("--world", type=int, required=True, help="ranks (GPUs) in the job")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (default 8)")
    parser.add_argument("--device", default="h100", help=f"one of {', '.join(device_names())} (default h100)")
    parser.add_argument("--device-memory", help="memory per rank, e.g. 80GiB (default: the device's)")
    parser.add_argument("--peak-tflops", type=float, help="dense peak per rank in the compute dtype")
    parser.add_argument("--intra-node-GBps", type=float, help="per-rank collective bandwidth inside a node")
    parser.add_argument("--inter-node-GBps", type=float, help="per-rank collective bandwidth across nodes")
    parser.add_argument("--efficiency", type=float, help="fraction of the peak the layers reach (default 0.5)")
    parser.add_argument("--rows", type=int, default=15, help="layouts shown in the table (default 15)")
    parser.add_argument("--out", help="write the best layout's recipe here")
    return parser


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        unknown = [arg for arg in overrides if not (arg.startswith("--") and "." in arg.split("=", 1)[0])]
        if unknown:
            raise ConfigError(f"{unknown[0]}: not a plan flag or a --section.field=value override")
        if args.world < 1 or args.gpus_per_node < 1:
            raise ConfigError(f"--world={args.world} --gpus-per-node={args.gpus_per_node}: both must be >= 1")
        device = with_overrides(named_device(args.device), args.device_memory, args.peak_tflops,
                                args.intra_node_GBps, args.inter_node_GBps, args.efficiency)
        cfg = load_config(args.config, overrides)
        print(f"planning {args.config or 'the default recipe'} on {args.world} x {device.describe()}", file=sys.stderr)
        plan = make_plan(cfg, args.world, min(args.gpus_per_node, args.world), device, _progress, args.rows)
        best = plan.best
        if best is None:
            smallest = plan.predictions[0]
            raise ConfigError(f"--device-memory={device.memory_bytes / GiB:.1f}GiB: no layout fits; the smallest, "
                              f"{smallest.layout.describe()} (micro batch {smallest.layout.micro_batch_size}, AC "
                              f"{smallest.layout.ac_mode}), needs {smallest.peak_bytes / GiB:.1f} GiB per rank "
                              f"(+{device.reserve_bytes / GiB:.0f} GiB reserve); use devices with more memory, more "
                              "ranks, or a shorter train.seq_len")
    except ValueError as e:  # ConfigError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{plan.candidates} layouts predicted (meshes, batch splits, schedules, AC modes), {plan.fitting} fit in "
          f"{(device.memory_bytes - device.reserve_bytes) / GiB:.1f} GiB per rank; validation asked about "
          f"{plan.validated} of them, best first; activations measured on {plan.facts.profile.kinds} layer kind(s)")
    print("\n".join(table(plan, device, args.world, args.rows)))
    print(f"best: {best.layout.describe()}: {best.peak_bytes / GiB:.1f} GiB per rank, {best.step_s:.3g} s per step, "
          f"{best.tokens_per_s:,.0f} tokens/s")
    print("overrides: " + " ".join(recipe_overrides(best)))
    if args.out:
        raw = {}
        if args.config:
            with open(args.config) as f:
                raw = yaml.safe_load(f) or {}
        write_recipe(args.out, best_recipe(raw, best))
        print(f"wrote {args.out}")
    return 0
