"""What a GPU run depends on, checked and timed on the GPUs of this machine, as tables.

    python -m tests.bench.gpu_check [--out runs/gpu_check.json] [--quick]

Sections (each runs on its own; a failure is reported in its row, not raised):
- attention: which SDPA kernel HF's attention takes in bf16, and flash vs math time;
- grouped GEMM: `moe.experts.grouped_linear` on CUDA (the `torch._grouped_mm` path) against a
  per-expert loop: agreement and time, forward + backward;
- activation checkpointing: per mode, peak activation memory (`torch.cuda.max_memory_allocated`
  minus parameters and gradients), step time and loss, eager and with each block compiled;
- budget AC: `ac.mode=budget`'s fake-tensor prediction for CUDA bf16 against the measured peak,
  per uniform mode and for plans between them;
- training: the launcher's bf16 step (FSDP2 mixed precision) on a dense and a MoE model:
  tokens/s and MFU from the run's metrics file;
- expert parallel: with 2+ GPUs, every MoE dispatcher against alltoall over NCCL;
- tensor parallel: with 2+ GPUs, the launcher's bf16 step on all of them at tp = 1, 2, ... up to
  the GPU count (the rest dp_shard), same global batch: tokens/s, per-rank peak memory, losses.

Without CUDA it prints one line and exits 0, so `make gpu-check` is safe anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.bench.ep_gpu_check import check_expert_parallel, print_table
from tests.bench.results import write_results

MiB = 2 ** 20


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call, synchronised."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def _llama_config(hidden: int, layers: int, seq: int, vocab: int = 32000):
    from transformers import AutoConfig

    return AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                  num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                  num_key_value_heads=max(1, hidden // 512), head_dim=128, vocab_size=vocab,
                                  max_position_embeddings=seq, use_cache=False, tie_word_embeddings=False)


def _llama(hidden: int, layers: int, seq: int, vocab: int = 32000):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_llama_config(hidden, layers, seq, vocab), dtype=torch.bfloat16).cuda()


def check_attention(quick: bool) -> list[dict[str, Any]]:
    model = _llama(1024, 1, 1024)
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    recorder = _OpRecorder()
    with recorder, torch.no_grad():
        model(input_ids=ids)
    sdpa_ops = sorted(n for n in recorder.names if "attention" in n)
    rows = [dict(check="HF llama bf16 attention kernel", result=", ".join(sdpa_ops) or "none")]
    q, k, v = (torch.randn(4, 16, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        def step() -> None:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        try:
            seconds = _timed(step, 3 if quick else 10)
            rows.append(dict(check=f"sdpa {backend.name} fwd+bwd (4x16x2048x128)", result=f"{seconds * 1e3:.2f} ms"))
        except Exception as e:
            rows.append(dict(check=f"sdpa {backend.name}", result=f"unavailable: {str(e).splitlines()[0][:80]}"))
    return rows


def check_grouped_gemm(quick: bool) -> list[dict[str, Any]]:
    from moe.experts import _grouped_mm_works, grouped_linear

    experts, hidden, inter, rows_per = 8, 2048, 1408, 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    counts = [rows_per + 64 * (e % 3) - 64 for e in range(experts)]
    x = torch.randn(sum(counts), hidden, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    w = (torch.randn(experts, inter, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02).requires_grad_()
    out = grouped_linear(x, w, counts)
    loop = torch.cat([c @ e.t() for c, e in zip(x.split(counts), w.unbind(0))])
    exact = torch.cat([c.float() @ e.float().t() for c, e in zip(x.split(counts), w.unbind(0))])
    rel = lambda a: ((a.float() - exact).norm() / exact.norm()).item()  # noqa: E731

    def grouped() -> None:
        grouped_linear(x, w, counts).sum().backward()

    def looped() -> None:
        torch.cat([c @ e.t() for c, e in zip(x.split(counts), w.unbind(0))]).sum().backward()

    repeats = 3 if quick else 20
    return [dict(check="grouped_mm path taken (bf16, cuda)", result=str(_grouped_mm_works(x, w))),
            dict(check="relative error vs fp32: grouped / loop", result=f"{rel(out):.2e} / {rel(loop):.2e}"),
            dict(check=f"fwd+bwd {experts} experts, {sum(counts)} rows, {hidden}->{inter}: grouped / loop",
                 result=f"{_timed(grouped, repeats) * 1e3:.2f} ms / {_timed(looped, repeats) * 1e3:.2f} ms")]


def _measured_step(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Peak activation MiB of one training step (after a warm-up step), median step ms, loss."""
    from harness.loss import token_loss_sum

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = token_loss_sum(logits.float(), ids[:, 1:]) / ids[:, 1:].numel()
        loss.backward()
        return loss.detach()

    loss = step()  # warm-up (and compile)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    # Parameters are resident before and after; gradients (as many bytes) are allocated during the step.
    activation_mib = (torch.cuda.max_memory_allocated() - before - param_bytes) / MiB
    return dict(activation_mib=activation_mib, step_ms=_timed(step, repeats) * 1e3, loss=loss.item())


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _ac_shape(quick: bool) -> tuple[int, int, int, int]:
    return (1024, 4, 1024, 2) if quick else (2048, 8, 2048, 4)


def _fresh_model_row(row: dict[str, Any], shape: tuple[int, int, int, int], prepare: Callable[[Any], None],
                     repeats: int) -> dict[str, Any]:
    """`row` plus the measured step of a fresh Llama of `shape` after `prepare(model)`, or its error."""
    hidden, layers, seq, batch = shape
    ids = torch.randint(0, 32000, (batch, seq + 1), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    try:
        model = _llama(hidden, layers, seq + 1)
        prepare(model)
        row.update(_measured_step(model, ids, repeats))
        del model
    except Exception as e:
        row["error"] = _error(e)
    torch.cuda.empty_cache()
    row["model"] = f"llama h{hidden} x{layers}, {batch}x{seq}, bf16"
    return row


def check_activation_checkpointing(quick: bool) -> list[dict[str, Any]]:
    from parallel.activation_checkpointing import AC_MODES, apply_activation_checkpointing

    rows = []
    for compiled in (False, True):
        def prepare(model: Any, mode: str) -> None:
            blocks = model.model.layers
            apply_activation_checkpointing(model, blocks, mode)
            if compiled:
                for i, block in enumerate(blocks):
                    blocks[i] = torch.compile(block)

        base = None
        for mode in AC_MODES:
            row = _fresh_model_row(dict(mode=mode, compile=compiled), _ac_shape(quick),
                                   lambda model: prepare(model, mode), 2 if quick else 5)
            if mode == "none":
                base = row
            if "error" not in row and base is not None and "error" not in base:
                row["memory_x_none"] = row["activation_mib"] / base["activation_mib"]
                row["time_x_none"] = row["step_ms"] / base["step_ms"]
                row["loss_equal_none"] = row["loss"] == base["loss"]
            rows.append(row)
    return rows


def check_budget_ac(quick: bool) -> list[dict[str, Any]]:
    """Predicted (fake tensors, as validation predicts for CUDA bf16) against measured activation
    peak: each uniform mode, then plans for budgets halfway between the uniform peaks."""
    from harness.loss import token_loss_sum
    from harness.model_parts import decoder_layers
    from harness.models import build_meta_model
    from parallel.ac_budget import BUDGET_MODES, StepShape, apply_budget_plan, choose_plan, measure_layers

    hidden, layers, seq, batch = _ac_shape(quick)
    meta = build_meta_model(_llama_config(hidden, layers, seq + 1))
    shape = StepShape(rows=batch, seq_len=seq, dtype=torch.bfloat16, device_type="cuda")
    started = time.perf_counter()
    measurement = measure_layers(meta, decoder_layers(meta), shape, token_loss_sum)
    peaks = [measurement.uniform_peak_bytes[mode] for mode in BUDGET_MODES]
    plans = {mode: ((mode,) * layers, peak) for mode, peak in zip(BUDGET_MODES, peaks)}
    for low, high in zip(peaks[1:], peaks):
        try:
            plan = choose_plan(meta, decoder_layers(meta), (low + high) // 2, shape, token_loss_sum,
                               measurement=measurement)
        except ValueError:  # full is not the smallest mode on a model this small: no plan fits
            continue
        plans[f"budget {(low + high) / 2 / MiB:.0f} MiB"] = (plan.layer_modes, plan.predicted_bytes)
    predict_s = time.perf_counter() - started
    rows = []
    for name, (layer_modes, predicted) in plans.items():
        row = _fresh_model_row(dict(plan=name, modes=" ".join(m[0] for m in layer_modes), predicted_mib=predicted / MiB,
                                    predict_s=predict_s), _ac_shape(quick),
                               lambda model: apply_budget_plan(model, model.model.layers, layer_modes),
                               2 if quick else 5)
        if "error" not in row:
            row["predicted_x_measured"] = row["predicted_mib"] / row["activation_mib"]
        rows.append(row)
    return rows


def _launch_run(name: str, overrides: list[str], out_dir: str, steps: int) -> dict[str, Any]:
    metrics = os.path.join(out_dir, f"{name}.jsonl")
    cmd = [sys.executable, "-m", "launch", "--nproc-per-node", str(torch.cuda.device_count()),
           f"--train.steps={steps}", "--train.warmup_steps=2", f"--train.metrics_file={metrics}",
           "--logging.progress=false", "--logging.log_every=1", "--parallel.dp_shard=-1", "--parallel.pp=1",
           "--parallel.ep=1", "--parallel.pp_schedule=1F1B", "--parallel.pp_microbatches=null",
           f"--run.dir={os.path.join(out_dir, name.replace(' ', '_'))}", *overrides]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        log = os.path.join(out_dir, f"{name.replace(' ', '_')}.log")
        with open(log, "w") as f:
            f.write(proc.stdout + proc.stderr)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line]
        return dict(run=name, error=(errors[-1] if errors else "exit code %d" % proc.returncode)[:300], log=log)
    rows = [json.loads(line) for line in open(metrics)]
    steady = rows[2:] or rows
    ac_line = next((line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
                    if "activation checkpointing:" in line), "")
    return dict(run=name, ac=ac_line.split("activation checkpointing:")[-1].strip(), steps=len(rows), first_loss=rows[0]["loss"], last_loss=rows[-1]["loss"],
                tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
                step_ms=statistics.median(r["step_time_s"] for r in steady) * 1e3,
                mfu=statistics.median(r["mfu"] for r in steady), peak_mib=max(r["peak_mib"] for r in rows),
                wall_s=wall)


DENSE_0_7B = ["--model.preset=llama", "--model.overrides.hidden_size=2048", "--model.overrides.num_attention_heads=16",
              "--model.overrides.num_key_value_heads=4", "--model.overrides.head_dim=128",
              "--model.overrides.intermediate_size=5632", "--model.overrides.num_hidden_layers=12",
              "--model.overrides.vocab_size=32000", "--model.overrides.max_position_embeddings=2048",
              "--train.seq_len=2048", "--train.micro_batch_size=4", "--train.global_batch_size=4",
              "--train.lr=3e-4"]
MOE_0_5B = ["--model.preset=qwen3_moe", "--model.overrides.hidden_size=1024", "--model.overrides.num_attention_heads=8",
            "--model.overrides.num_key_value_heads=4", "--model.overrides.head_dim=128",
            "--model.overrides.moe_intermediate_size=512", "--model.overrides.num_experts=32",
            "--model.overrides.num_experts_per_tok=4", "--model.overrides.num_hidden_layers=8",
            "--model.overrides.vocab_size=32000", "--model.overrides.max_position_embeddings=2048",
            "--train.seq_len=2048", "--train.micro_batch_size=4", "--train.global_batch_size=4",
            "--train.lr=3e-4"]


def check_training(quick: bool, out_dir: str) -> list[dict[str, Any]]:
    steps = 6 if quick else 10
    runs = [("llama-0.7B selective", DENSE_0_7B + ["--ac.mode=selective"]),
            ("llama-0.7B none", DENSE_0_7B + ["--ac.mode=none"]),
            ("llama-0.7B selective compiled", DENSE_0_7B + ["--ac.mode=selective", "--train.compile=true"]),
            ("llama-0.7B budget 9000 MiB", DENSE_0_7B + ["--ac.mode=budget", "--ac.budget_mib=9000"]),
            ("qwen3_moe-0.5B selective", MOE_0_5B + ["--ac.mode=selective"])]
    # The presets' batch is one data-parallel rank's: every GPU is one here.
    batch = [f"--train.global_batch_size={4 * torch.cuda.device_count()}"]
    return [_launch_run(name, overrides + batch, out_dir, steps) for name, overrides in runs[: 1 if quick else None]]


def check_tensor_parallel(quick: bool, out_dir: str) -> list[dict[str, Any]]:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return [dict(check="tensor parallel over NCCL", result=f"skipped: needs 2+ GPUs, found {gpus}")]
    steps = 6 if quick else 10
    sizes = [tp for tp in (1, 2, 4, 8) if tp <= gpus and gpus % tp == 0]
    # Each GPU holds the same tokens at every tp: a data-parallel rank (tp GPUs) takes tp sequences.
    return [_launch_run(f"llama-0.7B tp={tp} selective",
                        DENSE_0_7B + ["--ac.mode=selective", f"--parallel.tp={tp}", f"--train.micro_batch_size={tp}",
                                      f"--train.global_batch_size={gpus}"], out_dir, steps) for tp in sizes]


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n## {title}")
    if rows:
        print_table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("runs", "gpu_check.json"))
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument("--sections", nargs="*", help="run only the sections whose titles start with these words")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check")
        return 0
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
    results: dict[str, Any] = {}
    work_dir = tempfile.mkdtemp(prefix="gpu_check_")
    sections = [("attention", lambda: check_attention(args.quick)),
                ("grouped GEMM", lambda: check_grouped_gemm(args.quick)),
                ("training (launcher, bf16)", lambda: check_training(args.quick, work_dir)),
                ("activation checkpointing", lambda: check_activation_checkpointing(args.quick)),
                ("budget AC", lambda: check_budget_ac(args.quick)),
                ("expert parallel", lambda: check_expert_parallel(args.quick)),
                ("tensor parallel", lambda: check_tensor_parallel(args.quick, work_dir))]
    for title, run in sections:
        if args.sections and not title.startswith(tuple(args.sections)):
            continue
        started = time.perf_counter()
        try:
            rows = run()
        except Exception:
            rows = [dict(error=traceback.format_exc().strip().splitlines()[-1][:300])]
        results[title] = rows
        _print_rows(f"{title} ({time.perf_counter() - started:.0f} s)", rows)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
