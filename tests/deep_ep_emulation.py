"""The `deep_ep` emulation (tests/fake_deep_ep) set up in a rank process, and the machine it pretends to be."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from unittest import mock

from torch.distributed.device_mesh import init_device_mesh

FAKE_DEEP_EP = os.path.join(os.path.dirname(__file__), "fake_deep_ep")
SXM_GPU = "NVIDIA H100 80GB HBM3"
PCIE_GPU = "NVIDIA A100-PCIE-40GB"
_extension_folder: tempfile.TemporaryDirectory | None = None


def emulated_deep_ep():
    """Imports the emulation in this rank process; HybridEP built for several NVLink domains."""
    sys.path.insert(0, FAKE_DEEP_EP)
    # Two NVLink domains of 2 ranks: at EP=4, HybridEP's local rank differs from the EP rank.
    os.environ["NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN"] = "2"
    install_hybrid_ep_build(multinode=True)
    # Upstream reads the GPU's name when a DeepEP buffer is built, after the CUDA check.
    mock.patch("torch.cuda.get_device_name", return_value=SXM_GPU).start()
    import deep_ep

    assert deep_ep.__file__.startswith(FAKE_DEEP_EP), deep_ep.__file__
    return deep_ep


def install_hybrid_ep_build(multinode: bool) -> None:
    """Stands in for how deep_ep's HybridEP was built: the emulation reads HYBRID_EP_MULTINODE, the
    harness reads the extension binary, which the multi-node build links to the RDMA verbs library."""
    global _extension_folder
    if _extension_folder is None:
        _extension_folder = tempfile.TemporaryDirectory()
        sys.path.insert(0, _extension_folder.name)
    os.environ["HYBRID_EP_MULTINODE"] = "1" if multinode else "0"
    with open(os.path.join(_extension_folder.name, "hybrid_ep_cpp.so"), "wb") as f:
        f.write(b"\x7fELF stand-in\0" + (b"libibverbs.so.1\0" if multinode else b""))


@contextmanager
def cuda_reported():
    # The emulation runs its kernels on CPU: the backends' CUDA check is the one thing it cannot pass.
    with mock.patch("torch.cuda.is_available", return_value=True):
        yield


def ep_mesh(ep: int, world: int):
    return init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep"))["ep"]
