"""The DeepEP/HybridEP start-up rules on given facts (the hardware a CPU machine has not), and the
probes that gather those facts, which answer "unknown" where they cannot run."""

from __future__ import annotations

import pytest
import torch

from moe import deepep_support, hybridep_support
from moe.deep_ep_runtime import first_problem, host_block_size, row_size_problem
from moe.deepep_support import RankFacts as DeepEPFacts
from moe.gpu_probe import gpu_name, gpu_uuid, nvlink_peers
from moe.hybridep_support import RankFacts as HybridEPFacts

SXM, PCIE = "NVIDIA H100 80GB HBM3", "NVIDIA A100-PCIE-40GB"


def test_host_blocks_and_first_problem() -> None:
    assert host_block_size(["a"] * 4) == 4
    assert host_block_size(["a", "a", "b", "b"]) == 2
    assert host_block_size(["a", "b", "a", "b"]) is None  # a host's ranks not consecutive
    assert host_block_size(["a", "a", "a", "b"]) is None
    assert first_problem([None, None]) is None
    assert first_problem(["x", "x"]) == "x"
    assert first_problem([None, "x", "y"]) == "rank 1: x"


def test_row_size() -> None:
    assert row_size_problem(64) is None and row_size_problem(7168) is None
    assert row_size_problem(60) == ("hidden size 60 makes rows of 120 bytes; the kernels copy rows in 16-byte units "
                                    "(a hidden size divisible by 8)")


def _deepep(host: str = "a", name: str | None = SXM, uuid: str = "GPU-0", peers: frozenset | None = None,
            local_problem: str | None = None) -> DeepEPFacts:
    return DeepEPFacts(local_problem, host, name, uuid, peers)


def test_deepep_rules() -> None:
    problem = deepep_support.group_problem
    assert problem([_deepep()] * 8) is None
    assert problem([_deepep()] * 6).startswith("EP size 6 unsupported on one host")
    assert problem([_deepep("a"), _deepep("b")]).startswith("EP group of 2 ranks spans 2 hosts")
    assert problem([_deepep(host) for host in "ab" for _ in range(8)]) is None
    assert problem([_deepep(local_problem="no CUDA device"), _deepep()]) == "rank 0: no CUDA device"
    # PCIe cards: 2 ranks at most, NVLink-bridged, as upstream asserts when the buffer is built.
    assert problem([_deepep(name=PCIE)] * 4).startswith(f"{PCIE} is a PCIe card")
    assert problem([_deepep(name=None)] * 2).startswith("cannot read the GPU's name")
    pair = [_deepep(name=PCIE, uuid="GPU-0", peers=frozenset({"GPU-1"})),
            _deepep(name=PCIE, uuid="GPU-1", peers=frozenset({"GPU-0"}))]
    assert problem(pair) is None
    assert problem([pair[0], _deepep(name=PCIE, uuid="GPU-2", peers=frozenset())]).endswith("are not NVLink-bridged, "
                                                                                            "which DeepEP needs")
    assert problem([pair[0], _deepep(name=PCIE, uuid="GPU-1")]).startswith("cannot check that the 2 PCIe GPUs")
    assert problem([_deepep(uuid="GPU-0"), _deepep(uuid="GPU-1")]) is None  # not PCIe: no NVLink check upstream


def _hybridep(host: str = "a", setting: str | None = None, build: bool | None = False,
              local_problem: str | None = None) -> HybridEPFacts:
    return HybridEPFacts(local_problem, host, setting, build)


def test_hybridep_rules() -> None:
    problem = hybridep_support.group_problem
    assert problem([_hybridep()] * 4) is None
    two_hosts = [_hybridep(host) for host in "aabb"]
    assert problem(two_hosts) == ("EP group of 4 ranks spans 2 NVLink domains of 2 (one per host; with multi-node "
                                  "NVLink set NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN), which deep_ep's intranode "
                                  "HybridEP build cannot serve: reinstall it with HYBRID_EP_MULTINODE=1")
    assert problem([_hybridep(host, build=None) for host in "aabb"]).endswith(
        "cannot tell how it was built (hybrid_ep_cpp not found or unreadable)")
    assert problem([_hybridep(host, build=True) for host in "aabb"]) is None
    assert problem([_hybridep(host) for host in "abab"]).startswith("EP group of 4 ranks is not one block")
    # The environment's domain size wins over the hosts, as upstream reads it.
    assert problem([_hybridep(host, setting="4") for host in "aabb"]) is None
    assert problem([_hybridep(setting="2", build=True)] * 4) is None
    assert problem([_hybridep(setting="2")] * 4).startswith(
        "EP group of 4 ranks spans 2 NVLink domains of 2 (NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN=2)")
    assert problem([_hybridep(setting="3")] * 4).startswith("EP size 4 is not a whole number of NVLink domains of 3")
    assert problem([_hybridep(setting="x")] * 4) == "NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN='x' is not a whole number"
    assert problem([_hybridep(setting="2"), _hybridep()]).startswith(
        "NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN differs between the ranks")
    assert problem([_hybridep(), _hybridep(local_problem="no CUDA device")]) == "rank 1: no CUDA device"


@pytest.mark.parametrize("content, expected", [(b"\x7fELF\0libibverbs.so.1\0", True), (b"\x7fELF\0libcuda.so.1\0", False),
                                               (b"", None), (None, None)])
def test_multinode_build_is_read_from_the_extension(tmp_path, monkeypatch, content, expected) -> None:
    monkeypatch.setattr(hybridep_support, "EXTENSION", "hybrid_ep_cpp_stand_in")  # not an installed one
    if content is not None:
        (tmp_path / "hybrid_ep_cpp_stand_in.so").write_bytes(content)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert hybridep_support.multinode_build() is expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU answers")
def test_gpu_probes_answer_unknown_without_a_gpu() -> None:
    assert gpu_name() is None and gpu_uuid() is None
    assert nvlink_peers("GPU-00000000-0000-0000-0000-000000000000") is None
