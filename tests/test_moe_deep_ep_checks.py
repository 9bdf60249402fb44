"""DeepEP and HybridEP where upstream fails, against the `deep_ep` emulation (tests/fake_deep_ep),
which fails there as upstream does; 4 gloo ranks, HF's Qwen3-MoE experts in bf16 under EP:
- HybridEP's combine leaves the rows of tokens no rank received unwritten (NaN in the emulation):
  outputs and gradients match alltoall's, zero for such tokens;
- HybridEP needs one token count on every rank: ranks of 5, 3, 6 and 4 tokens match alltoall;
- an EP group over several NVLink domains (a host per rank, no domain size set) falls back from
  HybridEP's intranode build with the reason, or raises under strict; the multi-node build runs it;
- DeepEP on PCIe GPUs: 4 ranks fall back (upstream asserts 2 at most), and 2 ranks too while
  NVLink between the pair cannot be checked;
- a hidden size whose bf16 rows are not whole 16-byte units falls back from both backends.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any, Callable
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from harness.models import load_config
from moe.expert_parallel import apply_expert_parallel
from tests.deep_ep_emulation import PCIE_GPU, cuda_reported, emulated_deep_ep, ep_mesh, install_hybrid_ep_build
from tests.multiproc import run_ranks

WORLD = 4
NUM_EXPERTS = 8  # the qwen3_moe preset's
TOP_K = 2
UNEQUAL_TOKENS = (5, 3, 6, 4)


def _experts(backend: str, ep: int, hidden_size: int, strict: bool) -> nn.Module:
    experts = Qwen3MoeExperts(load_config("qwen3_moe", None, {"hidden_size": hidden_size}))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    experts.to(torch.bfloat16)
    with cuda_reported():
        apply_expert_parallel([(experts, None)], ep_mesh(ep, WORLD), backend, strict)
    return experts


def _step(backend: str, ep: int = 4, tokens: int = 6, unrouted: bool = False, hidden_size: int = 64,
          strict: bool = False) -> dict:
    """One forward and backward of this rank's tokens; with `unrouted`, every third token has only
    the padding id (past the experts), so no rank receives it."""
    experts = _experts(backend, ep, hidden_size, strict)
    generator = torch.Generator().manual_seed(11 + dist.get_rank())
    ids = torch.stack([torch.randperm(NUM_EXPERTS, generator=generator)[:TOP_K] for _ in range(tokens)])
    if unrouted:
        ids[::3] = NUM_EXPERTS
    hidden = torch.randn(tokens, hidden_size, generator=generator).bfloat16().requires_grad_()
    weights = torch.rand(tokens, TOP_K, generator=generator).bfloat16().requires_grad_()
    out = experts(hidden, ids, weights)
    out.float().square().sum().backward()
    return dict(reason=experts._expert_parallel.dispatcher_reason, out=out.detach(), grad_hidden=hidden.grad,
                grad_weights=weights.grad, grad_experts=[p.grad.to_local() for p in experts.parameters()])


def _outcome(fn: Callable[[], Any]) -> Any:
    """What `fn` returns, or the error it raised, as one line."""
    try:
        return fn()
    except Exception as exc:  # an emulated upstream assert, or the harness's refusal: either is the result
        return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _reason(backend: str, **step) -> Any:
    return _outcome(lambda: _step(backend, **step)["reason"])


def _all_cases(rank: int, world: int) -> dict:
    emulated_deep_ep()
    results: dict = {}
    for backend in ("alltoall", "deepep", "hybridep"):
        results[("unrouted", backend)] = _outcome(lambda: _step(backend, unrouted=True))
        results[("unequal", backend)] = _outcome(lambda: _step(backend, tokens=UNEQUAL_TOKENS[rank]))
    with mock.patch("socket.gethostname", return_value=f"host{rank}"), mock.patch.dict(os.environ):
        del os.environ["NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN"]
        install_hybrid_ep_build(multinode=False)
        results["domains"] = _reason("hybridep", ep=2)
        results["domains_strict"] = _reason("hybridep", ep=2, strict=True)
        install_hybrid_ep_build(multinode=True)
        results["domains_multinode"] = _reason("hybridep", ep=2)
    with mock.patch("torch.cuda.get_device_name", return_value=PCIE_GPU):
        results["pcie"] = {ep: _reason("deepep", ep=ep) for ep in (4, 2)}
    results["row_size"] = {backend: _reason(backend, hidden_size=60) for backend in ("deepep", "hybridep")}
    return results


@cache
def _results() -> list[dict]:
    return run_ranks(_all_cases, WORLD, timeout=600)


def _assert_matches_alltoall(case: str, backend: str, results: dict) -> None:
    mine, reference = results[(case, backend)], results[(case, "alltoall")]
    assert isinstance(mine, dict) and mine["reason"] == backend, (case, backend, mine)
    for name in ("out", "grad_hidden", "grad_weights", "grad_experts"):
        got, want = mine[name], reference[name]
        for g, w in zip(got, want) if isinstance(got, list) else [(got, want)]:
            assert torch.isfinite(g).all(), (case, backend, name)
            torch.testing.assert_close(g, w, rtol=0.02, atol=0.02, msg=f"{case} {backend} {name}")


def test_rows_of_tokens_no_rank_receives_are_zero_on_every_backend() -> None:
    for results in _results():
        for backend in ("deepep", "hybridep"):
            _assert_matches_alltoall("unrouted", backend, results)
            step = results[("unrouted", backend)]
            assert not step["out"][::3].any() and not step["grad_hidden"][::3].any(), backend
            assert step["out"][1::3].any(), backend


def test_unequal_token_counts_match_alltoall() -> None:
    for results in _results():
        for backend in ("deepep", "hybridep"):
            _assert_matches_alltoall("unequal", backend, results)


def test_hybridep_over_nvlink_domains_needs_the_multinode_build() -> None:
    for results in _results():
        assert results["domains"].startswith("hybridep: EP group of 2 ranks spans 2 NVLink domains of 1 "
                                             "(one per host") and results["domains"].endswith(
            "intranode HybridEP build cannot serve: reinstall it with HYBRID_EP_MULTINODE=1 -> alltoall"), results
        assert results["domains_strict"].startswith(
            "RuntimeError: hybridep dispatcher requested with strict=True but unavailable: EP group of 2 ranks"), results
        assert results["domains_multinode"] == "hybridep", results


def test_deepep_on_pcie_gpus_falls_back() -> None:
    for results in _results():
        assert results["pcie"][4] == (f"deepep: {PCIE_GPU} is a PCIe card: DeepEP's kernels need NVLink between every "
                                      "pair of the 4 ranks, which PCIe cards have between pairs at most (ep=2 on an "
                                      "NVLink-bridged pair) -> alltoall"), results["pcie"]
        assert results["pcie"][2].startswith("deepep: cannot check that the 2 PCIe GPUs are NVLink-bridged") and \
            "install nvidia-ml-py" in results["pcie"][2], results["pcie"]


def test_rows_not_in_16_byte_units_fall_back() -> None:
    for results in _results():
        for backend, reason in results["row_size"].items():
            assert reason == (f"{backend}: hidden size 60 makes rows of 120 bytes; the kernels copy rows in 16-byte "
                              "units (a hidden size divisible by 8) -> alltoall"), reason
