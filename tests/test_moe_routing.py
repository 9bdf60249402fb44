"""The EP experts forward on handcrafted routings, against HF's own experts on one process.

Skewed cases: every token to one expert; a rank that receives nothing; a rank that sends
nothing; top-k larger than the experts per rank. Dedup: the hidden-state bytes dispatch
sends are exactly tokens x distinct destination ranks, never one row per routed expert.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from harness.models import load_config
from moe.expert_parallel import apply_expert_parallel
from tests.bench.traffic import TrafficLog
from tests.multiproc import run_ranks

WORLD = 4
TOKENS_PER_RANK = (5, 3, 6, 4)
NUM_EXPERTS = 8  # 2 per rank at EP=4


def _experts(config) -> Qwen3MoeExperts:
    experts = Qwen3MoeExperts(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return experts


def _routing(case: str, tokens: int) -> torch.Tensor:
    """[tokens, k] expert ids, distinct per row but in the last case."""
    row = torch.arange(tokens).unsqueeze(1)
    if case == "one_expert":
        return torch.full((tokens, 1), 3)
    if case == "rank0_receives_nothing":  # experts 0 and 1 live on rank 0
        return torch.stack([2 + row[:, 0] % 6, 2 + (row[:, 0] + 3) % 6], 1)
    if case == "topk_over_experts_per_rank":  # k=5 > 2 experts per rank: some ranks get 2 of a row's experts
        return torch.stack([torch.randperm(NUM_EXPERTS, generator=torch.Generator().manual_seed(t))[:5]
                            for t in range(tokens)]) if tokens else torch.empty(0, 5, dtype=torch.long)
    if case == "repeated_and_unrouted_ids":  # a hash router's table: an expert twice, or the padding id
        return torch.stack([row[:, 0] % NUM_EXPERTS, row[:, 0] % NUM_EXPERTS,
                            torch.where(row[:, 0] % 3 == 0, NUM_EXPERTS, (row[:, 0] + 5) % NUM_EXPERTS)], 1)
    raise AssertionError(case)


def _inputs(case: str, config) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per rank: hidden states, routed expert ids, routing weights (rank 3 sends nothing in one case)."""
    generator = torch.Generator().manual_seed(5)
    counts = (5, 3, 6, 0) if case == "rank0_receives_nothing" else TOKENS_PER_RANK
    per_rank = []
    for tokens in counts:
        ids = _routing(case, tokens)
        hidden = torch.randn(tokens, config.hidden_size, generator=generator)
        weights = torch.rand(ids.shape, generator=generator)
        per_rank.append((hidden, ids, weights))
    return per_rank


def _minimum_rows(ids: torch.Tensor, experts_per_rank: int) -> int:
    return sum(len(set((row[row < NUM_EXPERTS] // experts_per_rank).tolist())) for row in ids)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest entry (0 for empty tensors)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item() if a.numel() else 0.0


def _check_case(rank: int, world: int, case: str) -> dict:
    config = load_config("qwen3_moe", None)
    config._experts_implementation = "eager"  # HF's reference loop
    reference = _experts(config)
    per_rank = _inputs(case, config)
    # Reference: HF's eager experts on every rank's tokens in one process.
    hidden = torch.cat([h for h, _, _ in per_rank]).requires_grad_()
    weights = torch.cat([w for _, _, w in per_rank]).requires_grad_()
    ids = torch.cat([i for _, i, _ in per_rank])
    ref_out = reference(hidden, ids, weights)
    ref_out.square().sum().backward()

    experts = _experts(config)
    apply_expert_parallel([(experts, None)], init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
    my_hidden, my_ids, my_weights = (t.clone() for t in per_rank[rank])
    my_hidden.requires_grad_()
    my_weights.requires_grad_()
    log = TrafficLog(rank)
    with log:
        out = experts(my_hidden, my_ids, my_weights)
    out.square().sum().backward()

    start = sum(h.shape[0] for h, _, _ in per_rank[:rank])
    mine = slice(start, start + my_hidden.shape[0])
    diffs = [_max_diff(out, ref_out[mine]), _max_diff(my_hidden.grad, hidden.grad[mine]),
             _max_diff(my_weights.grad, weights.grad[mine])]
    diffs += [_max_diff(getattr(experts, name).grad.full_tensor(), getattr(reference, name).grad)
              for name in ("gate_up_proj", "down_proj")]
    row_bytes = config.hidden_size * 4
    return dict(diffs=diffs, sent=log.hidden_bytes("ep_dispatch", config.hidden_size),
                minimum=_minimum_rows(my_ids, NUM_EXPERTS // world) * row_bytes,
                per_expert=my_ids.numel() * row_bytes,
                received=sum(t.rows for t in log.transfers if t.op == "ep_combine" and t.row_shape == (config.hidden_size,)))


def _all_cases(rank: int, world: int) -> dict:
    return {case: _check_case(rank, world, case)
            for case in ("one_expert", "rank0_receives_nothing", "topk_over_experts_per_rank",
                         "repeated_and_unrouted_ids")}


def test_skewed_routings_match_hf_experts_and_dispatch_sends_each_token_once_per_rank() -> None:
    results = run_ranks(_all_cases, WORLD)
    for rank, cases in enumerate(results):
        for case, result in cases.items():
            assert max(result["diffs"]) < 1e-5, (rank, case, result["diffs"])
            assert result["sent"] == result["minimum"], (rank, case, result)
    # Rank 0 receives nothing in that case: it sends back (combines) no expert output.
    assert results[0]["rank0_receives_nothing"]["received"] == 0
    # Rank 3 has no tokens in that case: it sends nothing.
    assert results[3]["rank0_receives_nothing"]["sent"] == 0
    # With k=5 over 4 ranks a row shares ranks: dedup is strictly below one row per expert.
    for cases in results:
        topk = cases["topk_over_experts_per_rank"]
        assert topk["sent"] < topk["per_expert"], topk
