"""Expert-parallel benchmark on CPU gloo ranks: `python -m tests.bench.expert_parallel [out.json]`.

qwen3_moe preset, each rank trains on its own batch (forward + backward per step). Per EP
size it reports the step time, tokens/s against ep=1 (the same code on one rank), the share
of the step spent inside dispatch + combine (waiting for peers included), and the
hidden-state bytes the forward dispatch sends against the minimum (each token once per destination
rank) and against an all-to-all that sends one row per routed expert.
"""

from __future__ import annotations

import sys
import time

import torch

from harness.loss import token_loss_sum
from harness.models import load_config
from tests.bench.traffic import TrafficLog
from tests.moe_common import ep_model
from tests.multiproc import run_ranks
from tests.bench.results import write_results

ROWS, SEQ, WARMUP, STEPS = 4, 128, 1, 3


def _routing_bytes_bounds(model, config, inputs, world: int) -> tuple[int, int]:
    """(minimum, per-expert) hidden bytes to send for this batch's routing, from HF's routers."""
    picks = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out: picks.append(out[2]))
             for layer in model.model.layers]
    with torch.no_grad():
        model(inputs)
    for hook in hooks:
        hook.remove()
    per_rank = config.num_experts // world
    row = config.hidden_size * 4
    minimum = sum(int((torch.nn.functional.one_hot(p // per_rank, world).sum(1) > 0).sum()) for p in picks)
    return minimum * row, sum(p.numel() for p in picks) * row


def _bench(rank: int, world: int) -> dict:
    config = load_config("qwen3_moe", None)
    model, _ = ep_model(config, world)
    generator = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, config.vocab_size, (ROWS, SEQ + 1), generator=generator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    minimum, per_expert = _routing_bytes_bounds(model, config, inputs, world)
    step_times, comm_times = [], []
    for step in range(WARMUP + STEPS):
        forward, backward = TrafficLog(rank), TrafficLog(rank)
        torch.distributed.barrier()
        start = time.perf_counter()
        with forward:
            loss = token_loss_sum(model(inputs).logits, labels) / labels.numel()
        with backward:
            loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if step >= WARMUP:
            step_times.append(elapsed)
            comm_times.append(forward.seconds() + backward.seconds())
    everything = sum(t.bytes for log in (forward, backward) for t in log.transfers)
    return dict(step_s=step_times, comm_s=comm_times, tokens=inputs.numel(),
                dispatch_bytes=forward.hidden_bytes("ep_dispatch", config.hidden_size),
                minimum_bytes=minimum, per_expert_bytes=per_expert, step_bytes=everything)


def main(out_path: str) -> None:
    results = {}
    for world in (1, 2, 4):
        ranks = run_ranks(_bench, world)
        step = max(sum(r["step_s"]) / len(r["step_s"]) for r in ranks)  # the slowest rank sets the pace
        comm = sum(sum(r["comm_s"]) / len(r["comm_s"]) for r in ranks) / world
        results[f"ep{world}"] = dict(
            ep=world, step_s=step, tokens_per_s=sum(r["tokens"] for r in ranks) / step,
            comm_share=comm / step,
            dispatch_bytes=sum(r["dispatch_bytes"] for r in ranks),
            step_bytes_all_ops=sum(r["step_bytes"] for r in ranks),
            minimum_bytes=sum(r["minimum_bytes"] for r in ranks),
            per_expert_bytes=sum(r["per_expert_bytes"] for r in ranks))
    base = results["ep1"]["tokens_per_s"]
    for name, r in results.items():
        r["tokens_per_s_vs_ep1"] = r["tokens_per_s"] / base
        print(f"{name}: step {r['step_s'] * 1e3:.0f} ms, {r['tokens_per_s']:.0f} tok/s ({r['tokens_per_s_vs_ep1']:.2f}x ep1), "
              f"dispatch+combine {100 * r['comm_share']:.0f}% of step, forward dispatch {r['dispatch_bytes']} B "
              f"= {r['dispatch_bytes'] / r['minimum_bytes']:.2f}x minimum, "
              f"{r['dispatch_bytes'] / r['per_expert_bytes']:.2f}x per-expert all-to-all")
    write_results(out_path, dict(preset="qwen3_moe", rows_per_rank=ROWS, seq=SEQ, steps=STEPS, results=results))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/bench_expert_parallel.json")
