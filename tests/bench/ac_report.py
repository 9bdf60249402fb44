"""Activation memory and step time of each activation-checkpointing mode on one HF model.

    python -m tests.bench.ac_report [--preset llama] [--hidden 512 --layers 4 --seq 512 --batch 8]
                                    [--budget-mib 300 450]

Memory is measured at the tensor level with PyTorch's `MemTracker` (not process RSS, which the
CPU allocator's caching makes meaningless): "activations" is everything tracked at the peak
that is not a parameter, gradient or buffer. Step time (forward + backward) is the median of a
few untracked steps. Defaults are small enough for a CPU box. Each `--budget-mib` adds a row for
ac.mode=budget: the chosen per-layer plan, its predicted and measured MiB, and its step time
against the fastest uniform mode whose measured memory fits the same budget.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from typing import Any, Sequence

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import CheckpointPolicy, SelectiveCheckpointContext

from harness.loss import token_loss_sum
from harness.memory import MiB
from harness.model_parts import decoder_layers
from harness.models import PRESETS, build_meta_model, load_config, reference_model
from parallel.ac_budget import BudgetPlan, StepShape, apply_budget_plan, choose_plan, measure_layers
from parallel.activation_checkpointing import (AC_MODES, apply_activation_checkpointing,
                                               make_selective_checkpoint_context_fn)
from tests.bench.results import write_results

# MemTracker categories that are model state rather than activations.
_STATE_CATEGORIES = (_MemRefType.PARAM, _MemRefType.GRAD, _MemRefType.BUFFER, _MemRefType.OPT)


def _scaled_overrides(preset: str, hidden: int, layers: int, seq: int) -> dict[str, Any]:
    """Widen a tiny preset to `hidden`, keeping its head count and MLP ratios."""
    base = PRESETS[preset]
    scale = hidden // base["hidden_size"]
    overrides: dict[str, Any] = dict(hidden_size=hidden, num_hidden_layers=layers,
                                     head_dim=hidden // base["num_attention_heads"],
                                     max_position_embeddings=max(seq, base["max_position_embeddings"]))
    for key in ("intermediate_size", "moe_intermediate_size"):
        if key in base:
            overrides[key] = base[key] * scale
    return overrides


def _step(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model(input_ids=input_ids[:, :-1]).logits, input_ids[:, 1:]) / input_ids[:, 1:].numel()
    loss.backward()
    return loss.detach()


def peak_activation_bytes(model: torch.nn.Module, input_ids: torch.Tensor) -> int:
    tracker = MemTracker()
    tracker.track_external(model, input_ids)
    with tracker:
        _step(model, input_ids)
    peaks = tracker.get_tracker_snapshot("peak")
    return max(snap["Total"] - sum(snap.get(key, 0) for key in _STATE_CATEGORIES) for snap in peaks.values())


def budget_plans(config: Any, seq: int, batch: int, budgets_mib: Sequence[float]) -> dict[str, BudgetPlan]:
    """ac.mode=budget's plan for each budget, predicted as the harness predicts it (fp32 on CPU)."""
    meta = build_meta_model(config)
    layers = decoder_layers(meta)
    shape = StepShape(rows=batch, seq_len=seq, dtype=torch.float32, device_type="cpu")
    measurement = measure_layers(meta, layers, shape, token_loss_sum)
    return {f"budget {budget:g}": choose_plan(meta, layers, int(budget * MiB), shape, token_loss_sum,
                                              measurement=measurement) for budget in budgets_mib}


def measure(preset: str, hidden: int, layers: int, seq: int, batch: int, steps: int,
            budgets_mib: Sequence[float] = ()) -> list[dict[str, Any]]:
    """One row per AC mode, then one per budget: peak activation MiB, median step seconds, loss;
    budget rows also carry the plan and its predicted MiB."""
    config = load_config(preset, None, _scaled_overrides(preset, hidden, layers, seq))
    input_ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    plans = budget_plans(config, seq, batch, budgets_mib)
    models = {}
    for mode in AC_MODES:
        models[mode] = reference_model(config, seed=0)
        apply_activation_checkpointing(models[mode], decoder_layers(models[mode]), mode)
    for name, plan in plans.items():
        models[name] = reference_model(config, seed=0)
        apply_budget_plan(models[name], decoder_layers(models[name]), plan.layer_modes)
    losses = {mode: _step(model, input_ids).item() for mode, model in models.items()}  # also warm-up
    # Modes take turns within each round, so load from other processes hits all modes alike.
    times: dict[str, list[float]] = {mode: [] for mode in models}
    for _ in range(steps):
        for mode, model in models.items():
            start = time.perf_counter()
            _step(model, input_ids)
            times[mode].append(time.perf_counter() - start)
    rows = [dict(mode=mode, activation_mib=peak_activation_bytes(model, input_ids) / MiB,
                 step_s=statistics.median(times[mode]), loss=losses[mode]) for mode, model in models.items()]
    base = rows[0]
    for row in rows:
        row["memory_ratio"] = row["activation_mib"] / base["activation_mib"]
        row["time_ratio"] = row["step_s"] / base["step_s"]
    uniform = rows[:len(AC_MODES)]
    for row, plan in zip(rows[len(AC_MODES):], plans.values()):
        fitting = [r for r in uniform if r["activation_mib"] <= plan.budget_bytes / MiB]
        best = min(fitting, key=lambda r: r["step_s"]) if fitting else None
        row.update(budget_mib=plan.budget_bytes / MiB, plan=plan.mode_counts(),
                   predicted_mib=plan.predicted_bytes / MiB, best_uniform=best["mode"] if best else None,
                   vs_best_uniform=row["step_s"] / best["step_s"] if best else None)
    return rows


class _OpLog(TorchDispatchMode):
    """Each op's output bytes (0 for views of an input) and time; inside a decoder layer, also the
    selective policy's decision for it, asked in the order the checkpoint would ask."""

    def __init__(self) -> None:
        super().__init__()
        self.region, self.policy = "outside", None
        self.records: list[tuple[str, str, str, int, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - start
        if self.region == "skip":
            return out
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        size = sum(o.numel() * o.element_size() for o in tree_flatten(out)[0]
                   if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs)
        decision = "kept (not checkpointed)"
        if self.region == "layer":
            saved = self.policy(SelectiveCheckpointContext(is_recompute=False), func, *args, **kwargs)
            decision = "saved" if saved == CheckpointPolicy.MUST_SAVE else "recomputed"
        self.records.append((self.region, str(func), decision, size, seconds))
        return out


def op_table(preset: str, hidden: int, layers: int, seq: int, batch: int, repeats: int = 3) -> list[dict[str, Any]]:
    """Per op of one decoder layer (first layer) under the selective policy: calls, output MiB saved
    or recomputed, and forward ms (the recompute cost); plus the ops outside the layers (embedding,
    final norm, logits and loss), which autograd keeps whatever the AC mode."""
    config = load_config(preset, None, _scaled_overrides(preset, hidden, layers, seq))
    model = reference_model(config, seed=0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    log = _OpLog()
    context_fn = make_selective_checkpoint_context_fn()

    def enter(index: int, *_: Any) -> None:
        log.region = "layer" if index == 0 else "skip"
        log.policy = context_fn()[0].policy_fn  # fresh matmul counters per layer, as per checkpoint

    for index, layer in enumerate(decoder_layers(model)):
        layer.register_forward_pre_hook(partial(enter, index))
        layer.register_forward_hook(lambda *_: setattr(log, "region", "outside"))
    # Each op's time is its fastest of a few forwards: one forward's op times move with the load.
    runs = []
    for _ in range(repeats):
        log.records = []
        with log:
            token_loss_sum(model(input_ids=input_ids[:, :-1]).logits, input_ids[:, 1:])
        runs.append(log.records)
    fastest = [min(run[i][4] for run in runs) for i in range(len(runs[0]))]
    table: dict[tuple[str, str, str], dict[str, Any]] = {}
    for (region, op, decision, size, _), seconds in zip(runs[0], fastest):
        row = table.setdefault((region, op, decision), dict(region=region, op=op, decision=decision, calls=0,
                                                            mib=0.0, ms=0.0))
        row["calls"] += 1
        row["mib"] += size / MiB
        row["ms"] += seconds * 1e3
    return sorted(table.values(), key=lambda r: (r["region"] != "layer", r["decision"], -r["mib"]))


def format_op_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'region':<8} {'op':<52} {'decision':<24} {'calls':>5} {'out MiB':>8} {'fwd ms':>8}"]
    for r in rows:
        if r["mib"] < 0.05 and r["ms"] < 0.5:
            continue
        lines.append(f"{r['region']:<8} {r['op'][:52]:<52} {r['decision']:<24} {r['calls']:>5} {r['mib']:>8.2f} "
                     f"{r['ms']:>8.2f}")
    layer = [r for r in rows if r["region"] == "layer"]
    for decision in ("saved", "recomputed"):
        picked = [r for r in layer if r["decision"] == decision]
        lines.append(f"layer total {decision}: {sum(r['mib'] for r in picked):.2f} MiB, "
                     f"{sum(r['ms'] for r in picked):.2f} ms forward")
    outside = [r for r in rows if r["region"] == "outside"]
    lines.append(f"outside the layers: {sum(r['mib'] for r in outside):.2f} MiB produced")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'mode':<12} {'act MiB':>9} {'x none':>7} {'step s':>8} {'x none':>7} {'loss':>10}"]
    for r in rows:
        lines.append(f"{r['mode']:<12} {r['activation_mib']:>9.1f} {r['memory_ratio']:>7.2f} "
                     f"{r['step_s']:>8.3f} {r['time_ratio']:>7.2f} {r['loss']:>10.6f}")
    return "\n".join(lines)


def format_budget_table(rows: list[dict[str, Any]]) -> str:
    """The budget rows: plan, predicted vs measured MiB, step time against the fastest uniform mode
    that fits the same budget."""
    lines = [f"{'budget MiB':>10} {'plan':<34} {'predicted':>9} {'measured':>9} {'step s':>7} "
             f"{'best uniform that fits':>22} {'x it':>6}"]
    for r in rows:
        if "budget_mib" not in r:
            continue
        best = r["best_uniform"] or "none fits"
        ratio = f"{r['vs_best_uniform']:.2f}" if r["vs_best_uniform"] is not None else "-"
        lines.append(f"{r['budget_mib']:>10g} {r['plan']:<34} {r['predicted_mib']:>9.1f} {r['activation_mib']:>9.1f} "
                     f"{r['step_s']:>7.3f} {best:>22} {ratio:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama", choices=sorted(PRESETS))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (median reported)")
    parser.add_argument("--budget-mib", type=float, nargs="+", default=[],
                        help="add an ac.mode=budget row for each of these budgets (MiB)")
    parser.add_argument("--out", default=os.path.join("runs", "bench_ac_report.json"))
    args = parser.parse_args(argv)
    base_hidden = PRESETS[args.preset]["hidden_size"]
    if args.hidden % base_hidden or args.hidden < base_hidden:
        parser.error(f"--hidden must be a multiple of {base_hidden} for preset {args.preset}")
    if min(args.layers, args.seq, args.batch, args.steps) < 1:
        parser.error("--layers, --seq, --batch and --steps must be positive")
    if any(budget <= 0 for budget in args.budget_mib):
        parser.error("--budget-mib values must be positive")

    ops = op_table(args.preset, args.hidden, args.layers, args.seq, args.batch)
    print(f"{args.preset}: hidden {args.hidden}, {args.layers} layers, seq {args.seq}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print("selective AC, per op (first decoder layer; ops outside the layers are never checkpointed)")
    print(format_op_table(ops))
    try:
        rows = measure(args.preset, args.hidden, args.layers, args.seq, args.batch, args.steps, args.budget_mib)
    except ValueError as e:  # a budget below what every layer fully checkpointed needs
        parser.error(f"--budget-mib: {e}")
    print(format_table(rows))
    if args.budget_mib:
        print(format_budget_table(rows))
    write_results(args.out, dict(config=vars(args), load_average=os.getloadavg()[0], rows=rows, ops=ops))


if __name__ == "__main__":
    main()
