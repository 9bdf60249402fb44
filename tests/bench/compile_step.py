"""Compiled against eager training step (forward + backward) on CPU, per preset.

    python -m tests.bench.compile_step [--presets llama qwen3_moe] [--hidden 512 --layers 4 --seq 512 --batch 8]

Each transformer block compiled (`parallel.compile.compile_layers`, as `train.compile` does), no
activation checkpointing. The two models take turns step by step so load from other processes
hits both alike; times are medians after the warm-up steps (the compiled one's first step
compiles). The loss difference is inductor's fused kernels rounding differently.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from harness.model_parts import decoder_layers
from harness.models import PRESETS, load_config, reference_model
from parallel.compile import compile_layers, compile_unavailable_reason
from tests.bench.ac_report import _scaled_overrides, _step
from tests.bench.results import write_results

WARMUP = 3


def measure(preset: str, hidden: int, layers: int, seq: int, batch: int, steps: int) -> dict[str, Any]:
    config = load_config(preset, None, _scaled_overrides(preset, hidden, layers, seq))
    input_ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    eager, compiled = reference_model(config, seed=0), reference_model(config, seed=0)
    compile_layers(compiled, decoder_layers(compiled))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, float] = {}
    for step in range(WARMUP + steps):
        for name, model in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            loss = _step(model, input_ids)
            if step >= WARMUP:
                times[name].append(time.perf_counter() - start)
            elif step == 0:
                losses[name] = loss.item()
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return dict(preset=preset, eager_s=eager_s, compiled_s=compiled_s, speedup=eager_s / compiled_s,
                loss_difference=abs(losses["eager"] - losses["compiled"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["llama", "qwen3_moe"], choices=sorted(PRESETS))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model after the warm-up")
    parser.add_argument("--out", default=os.path.join("runs", "bench_compile_step.json"))
    args = parser.parse_args(argv)
    reason = compile_unavailable_reason("cpu")
    if reason is not None:
        parser.error(reason)
    for preset in args.presets:
        base = PRESETS[preset]["hidden_size"]
        if args.hidden % base or args.hidden < base:
            parser.error(f"--hidden must be a multiple of {base} for preset {preset}")
    load = os.getloadavg()[0]
    rows = [measure(p, args.hidden, args.layers, args.seq, args.batch, args.steps) for p in args.presets]
    print(f"hidden {args.hidden}, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"{'preset':<10} {'eager s':>8} {'compiled s':>10} {'speedup':>8} {'|loss diff|':>12}")
    for r in rows:
        print(f"{r['preset']:<10} {r['eager_s']:>8.3f} {r['compiled_s']:>10.3f} {r['speedup']:>8.2f} "
              f"{r['loss_difference']:>12.2e}")
    write_results(args.out, dict(config=vars(args), load_average=load, rows=rows))


if __name__ == "__main__":
    main()
