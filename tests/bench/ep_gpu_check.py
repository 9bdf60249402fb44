"""Expert-parallel dispatchers on the GPUs of one machine, over NCCL in bf16, as a table.

    python -m tests.bench.ep_gpu_check [--out runs/ep_gpu_check.json] [--quick]

For each dispatcher (alltoall, deepep, hybridep) at EP = every GPU (up to 8):
- start-up checks: what DeepEP's and HybridEP's checks saw on this machine (hosts, GPU names and
  which PCIe NVLink checks ran, NVLink domains and the HybridEP build) and what they decided;
- contracts: the real kernels where the CPU emulation can only mimic upstream: tokens routed to
  no expert (their combined rows and gradients must be zero) and a different token count per rank;
- parity: one forward and backward of qwen3_moe and deepseek_v3 under selective AC, loss and
  every gradient against alltoall (the CPU tests show them bitwise equal with the emulation);
- throughput: dispatch and combine alone on a synthetic batch, GB/s of hidden states received;
- step time: forward + backward of a larger MoE, without activation checkpointing and with SAC.
A backend that cannot run here (deep_ep not installed, an unsupported group) gets one row saying
why. With fewer than 2 GPUs or without CUDA it prints one line and exits 0. It re-runs itself
under torchrun, one process per GPU; `check_expert_parallel()` returns the rows for
tests/bench/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from moe.dispatch import DISPATCHERS
from tests.bench.results import write_results

PRESETS = ("qwen3_moe", "deepseek_v3")
GB = 1e9
NOT_RUN = "no start-up check, kernel contract, parity or timing ran"


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.device_count() < 2:
        return f"needs 2+ GPUs, found {torch.cuda.device_count()}"
    return None


def _world() -> int:
    # Powers of two up to 8: they divide every preset's expert count and DeepEP's intranode sizes.
    count = min(torch.cuda.device_count(), 8)
    return 1 << (count.bit_length() - 1)


def _cuda_timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn` after a warm-up call, timed with CUDA events."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _model(preset: str, dispatcher: str, ac_mode: str, overrides: dict | None = None):
    """A bf16 EP model on this GPU in the trainer's order: EP -> AC -> materialize."""
    from torch.distributed.device_mesh import init_device_mesh

    from harness.materialize import materialize
    from harness.model_parts import decoder_layers, moe_blocks
    from harness.models import build_meta_model, load_config, reference_model
    from moe.expert_parallel import apply_expert_parallel
    from moe.ops import SAC_SAVE_OPS
    from parallel.activation_checkpointing import apply_activation_checkpointing

    config = load_config(preset, None, overrides)
    mesh = init_device_mesh("cuda", (dist.get_world_size(),), mesh_dim_names=("ep",))
    model = build_meta_model(config)
    experts = apply_expert_parallel([(b.experts, b.router) for b in moe_blocks(model)], mesh, dispatcher)
    apply_activation_checkpointing(model, decoder_layers(model), ac_mode, extra_save_ops=SAC_SAVE_OPS)
    materialize(model, reference_model(config, 0), "cuda")
    model.to(torch.bfloat16)
    return model, config, experts[0]._expert_parallel


def _batch(vocab: int, rows: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=torch.Generator().manual_seed(dist.get_rank()))
    return tokens[:, :-1].cuda(), tokens[:, 1:].cuda()


def _step(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from harness.loss import token_loss_sum

    loss = token_loss_sum(model(inputs).logits.float(), labels) / labels.numel()
    loss.backward()
    return loss.detach()


def _grads(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n.replace("_checkpoint_wrapped_module.", ""): (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).float()
            for n, p in model.named_parameters() if p.grad is not None}


def _parity(preset: str) -> list[dict[str, Any]]:
    reference = None
    rows = []
    for name in DISPATCHERS:
        model, config, state = _model(preset, name, "selective")
        if state.dispatcher.name != name:
            rows.append(dict(check="parity", preset=preset, dispatcher=name, result=state.dispatcher_reason))
            continue
        inputs, labels = _batch(config.vocab_size, 2, 64)
        loss, grads = _step(model, inputs, labels), _grads(model)
        if reference is None:
            reference = (loss, grads)
        worst = max((grads[n] - reference[1][n]).abs().max().item() for n in grads)
        scale = max(g.abs().max().item() for g in reference[1].values())
        rows.append(dict(check="parity", preset=preset, dispatcher=name,
                         loss_diff=abs(loss - reference[0]).item(), grad_max_diff=worst, grad_scale=scale,
                         result="bitwise" if worst == 0 and loss == reference[0] else "differs"))
    return rows


def _shapes(quick: bool) -> tuple[int, int, int, int]:
    """Tokens per rank, hidden size, experts and top-k of the synthetic batches."""
    return (1024, 2048, 32, 4) if quick else (4096, 7168, 64, 8)


def _startup_checks(quick: bool) -> list[dict[str, Any]]:
    from moe import deepep_support, hybridep_support
    from moe.deep_ep_runtime import gather_facts
    from moe.dispatch import resolve_dispatcher

    group = dist.group.WORLD
    deepep_facts = gather_facts(group, deepep_support.local_facts(None))
    hybridep_facts = gather_facts(group, hybridep_support.local_facts(None))
    names = sorted({str(f.gpu_name) for f in deepep_facts})
    if not any(deepep_support.is_pcie(name) for name in names):
        nvlink = "not needed (no PCIe card)"
    elif all(f.nvlink_peers is not None for f in deepep_facts):
        nvlink = "ran (NVML)"
    else:
        nvlink = "could not run (NVML unavailable)"
    setting = hybridep_facts[0].domain_size_setting
    domains = f"{hybridep_support.DOMAIN_SIZE_VARIABLE}={setting}" if setting else "one per host"
    builds = {{True: "yes", False: "no", None: "unknown"}[f.multinode_build] for f in hybridep_facts}
    hidden = _shapes(quick)[1]
    return [dict(check="start-up", dispatcher="deepep", hosts=len({f.host for f in deepep_facts}),
                 facts=f"GPUs {', '.join(names)}; PCIe NVLink pair check {nvlink}",
                 result=resolve_dispatcher("deepep", False, group, hidden)[1]),
            dict(check="start-up", dispatcher="hybridep", hosts=len({f.host for f in hybridep_facts}),
                 facts=f"NVLink domains {domains}; HYBRID_EP_MULTINODE build: {'/'.join(sorted(builds))}",
                 result=resolve_dispatcher("hybridep", False, group, hidden)[1])]


def _contracts(quick: bool) -> list[dict[str, Any]]:
    """Dispatch and combine (with backward) of rows, against alltoall: every third token routed to
    the padding id only, then a token count that differs per rank."""
    from moe.dispatch import resolve_dispatcher

    tokens, hidden, experts, top_k = _shapes(quick)
    rank = dist.get_rank()
    cases = {"unrouted tokens": tokens, "token count per rank": tokens - 8 * rank}
    # A group of its own: HybridEP's buffer keeps the token count its group agreed on first.
    group = dist.new_group(list(range(dist.get_world_size())))
    results: dict[tuple[str, str], Any] = {}
    for name in DISPATCHERS:
        dispatcher, reason = resolve_dispatcher(name, False, group, hidden)
        for case, count in cases.items():
            if dispatcher.name != name:
                results[(case, name)] = reason
                continue
            generator = torch.Generator(device="cuda").manual_seed(rank)
            x = torch.randn(count, hidden, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
            weights, ids = torch.rand(count, experts, device="cuda", generator=generator).topk(top_k, dim=1)
            if case == "unrouted tokens":
                ids[::3] = experts
            routed, handle = dispatcher.dispatch(x, ids, weights.to(x.dtype), experts)
            combined = dispatcher.combine(routed.x, handle)
            (combined.float() * torch.linspace(-1, 1, hidden, device="cuda")).sum().backward()
            results[(case, name)] = (combined.detach(), x.grad)
    rows = []
    for (case, name), got in results.items():
        if name == "alltoall":
            continue
        if isinstance(got, str):
            rows.append(dict(check=f"contract: {case}", dispatcher=name, result=got))
            continue
        finite = all(bool(t.isfinite().all()) for t in got)
        unrouted_zero = case != "unrouted tokens" or not any(bool(t[::3].any()) for t in got)
        diff = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, results[(case, "alltoall")]))
        # Over every rank: the worst difference, and whether any rank saw bad rows.
        worst = torch.tensor([diff, float(not (finite and unrouted_zero))], device="cuda")
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        rows.append(dict(check=f"contract: {case}", dispatcher=name, max_diff=worst[0].item(),
                         result="non-finite or unwritten rows" if worst[1].item() else "ok"))
    return rows


def _throughput(quick: bool) -> list[dict[str, Any]]:
    from moe.dispatch import resolve_dispatcher

    tokens, hidden, experts, top_k = _shapes(quick)
    generator = torch.Generator(device="cuda").manual_seed(dist.get_rank())
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
    weights, ids = torch.rand(tokens, experts, device="cuda", generator=generator).topk(top_k, dim=1)
    weights = weights.to(x.dtype)
    rows = []
    for name in DISPATCHERS:
        dispatcher, reason = resolve_dispatcher(name, False, dist.group.WORLD, hidden)
        if dispatcher.name != name:
            rows.append(dict(check="throughput", dispatcher=name, result=reason))
            continue
        times: list[tuple[float, float]] = []
        received = 0
        for repeat in range(11):  # the first is a warm-up
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            with torch.no_grad():
                marks[0].record()
                routed, handle = dispatcher.dispatch(x, ids, weights, experts)
                marks[1].record()
                dispatcher.combine(routed.x, handle)
                marks[2].record()
            torch.cuda.synchronize()
            received = routed.x.shape[0] * hidden * x.element_size()
            if repeat:
                times.append((marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2])))
        dispatch_ms = statistics.median(t[0] for t in times)
        combine_ms = statistics.median(t[1] for t in times)
        rows.append(dict(check="throughput", dispatcher=name, tokens=tokens, hidden=hidden, top_k=top_k,
                         dispatch_ms=dispatch_ms, combine_ms=combine_ms,
                         dispatch_GBps=received / GB / (dispatch_ms / 1e3), combine_GBps=received / GB / (combine_ms / 1e3)))
    return rows


def _step_times(quick: bool) -> list[dict[str, Any]]:
    overrides = dict(hidden_size=1024, moe_intermediate_size=512, intermediate_size=2048)
    rows = []
    for preset in PRESETS:
        experts_field = "num_experts" if preset == "qwen3_moe" else "n_routed_experts"
        for name in DISPATCHERS:
            for ac_mode in ("none", "selective"):
                model, config, state = _model(preset, name, ac_mode, {**overrides, experts_field: 16})
                if state.dispatcher.name != name:
                    rows.append(dict(check="step", preset=preset, dispatcher=name, ac=ac_mode,
                                     result=state.dispatcher_reason))
                    break
                inputs, labels = _batch(config.vocab_size, 2 if quick else 4, 512 if quick else 2048)
                torch.cuda.reset_peak_memory_stats()
                ms = _cuda_timed(lambda: _step(model, inputs, labels), 3 if quick else 10)
                rows.append(dict(check="step", preset=preset, dispatcher=name, ac=ac_mode, step_ms=ms,
                                 peak_GiB=torch.cuda.max_memory_allocated() / 2 ** 30))
                del model
    return rows


def _worker(out: str, quick: bool) -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rows = []
    sections = [lambda: _startup_checks(quick), lambda: _contracts(quick)] + [lambda p=p: _parity(p) for p in PRESETS]
    for section in sections + [lambda: _throughput(quick), lambda: _step_times(quick)]:
        try:
            rows += section()
        except Exception as exc:  # one failing section is a row, the others still run
            rows.append(dict(check="error", result=f"{type(exc).__name__}: {exc}"[:300]))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
    dist.destroy_process_group()


def check_expert_parallel(quick: bool = False) -> list[dict[str, Any]]:
    """Runs the check under torchrun on every GPU (up to 8); its rows, or one saying why not."""
    reason = _skip_reason()
    if reason is not None:
        return [dict(check="EP dispatchers over NCCL", result=f"skipped: {reason} ({NOT_RUN})")]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={_world()}",
                   "-m", "tests.bench.ep_gpu_check", "--worker", f"--out={out}"] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(out):
            return [dict(check="EP dispatchers over NCCL", result="failed: " + (done.stderr or done.stdout)[-300:])]
        with open(out) as f:
            return json.load(f)


def print_table(rows: list[dict[str, Any]]) -> None:
    """Rows of dicts as a markdown table (the union of their keys as columns)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (row.get(k, "") for k in keys)]
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("runs", "ep_gpu_check.json"))
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.out, args.quick)
        return 0
    reason = _skip_reason()
    if reason is not None:
        print(f"ep_gpu_check: skipped ({reason}; {NOT_RUN})")
        return 0
    rows = check_expert_parallel(args.quick)
    print_table(rows)
    write_results(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
