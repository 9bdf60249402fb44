"""Dispatcher resolution and the custom ops' registration.

With deep_ep hidden (installed or not), `deepep` and `hybridep` fall back to alltoall with exactly
one logged line per model, strict raises, and the op names the selective-AC policy saves
exist in torch.ops.harness with fake and autograd implementations that opcheck accepts;
torch.ops.deepep.* and torch.ops.hybridep.* resolve and have fake implementations.
"""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import init_device_mesh
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from harness.models import build_meta_model, load_config
from moe.alltoall import AllToAllDispatcher
from moe.dispatch import resolve_dispatcher
from moe.expert_parallel import apply_expert_parallel
from moe.ops import SAC_SAVE_OPS
from tests.moe_common import ep_blocks
from tests.multiproc import run_ranks


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _errors(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _resolution(rank: int, world: int) -> dict:
    sys.modules["deep_ep"] = None  # import fails here even where DeepEP is installed: the fallback is under test
    group = dist.group.WORLD
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    records = _Records()
    logging.getLogger("moe.dispatch").addHandler(records)
    model = build_meta_model(load_config("qwen3_moe", None))
    experts = apply_expert_parallel(ep_blocks(model), mesh, "deepep")
    deepep_lines = list(records.lines)
    records.lines.clear()
    hybrid, hybrid_reason = resolve_dispatcher("hybridep", False, group, 64)

    x = torch.randn(3 + rank, 4, dtype=torch.float64, requires_grad=True)
    splits = [1, 2 + rank] if rank else [2, 1]
    received = [splits[rank] for splits in ([2, 1], [1, 3])]
    torch.library.opcheck(torch.ops.harness.ep_dispatch.default, (x, splits, received, group.group_name),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.harness.ep_combine.default, (x, splits, received, group.group_name),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    return dict(
        deepep_lines=deepep_lines, experts=len(experts),
        dispatchers={type(m._expert_parallel.dispatcher).__name__ for m in experts},
        hybrid=(type(hybrid).__name__, hybrid_reason, list(records.lines)),
        strict=_errors(lambda: resolve_dispatcher("deepep", True, group, 64)),
        unknown=_errors(lambda: resolve_dispatcher("nccl", False, group, 64)),
        indivisible=_errors(lambda: apply_expert_parallel(
            ep_blocks(build_meta_model(load_config("qwen3_moe", None, {"num_experts": 7}))), mesh)),
    )


def test_backends_fall_back_once_strict_raises_and_ops_are_registered() -> None:
    for result in run_ranks(_resolution, 2):
        assert result["experts"] == 4 and result["dispatchers"] == {AllToAllDispatcher.__name__}
        assert len(result["deepep_lines"]) == 1, result["deepep_lines"]
        assert result["deepep_lines"][0].startswith("deepep: ") and result["deepep_lines"][0].endswith("-> alltoall")
        name, reason, lines = result["hybrid"]
        assert name == AllToAllDispatcher.__name__ and lines == [reason] and reason.startswith("hybridep: ")
        assert result["strict"].startswith("RuntimeError: deepep dispatcher requested with strict=True")
        assert result["unknown"].startswith("ValueError: moe dispatcher 'nccl' unknown")
        assert result["indivisible"].startswith("ValueError:") and "num_experts=7 is not divisible by ep=2" in result["indivisible"]


def test_saved_op_names_exist() -> None:
    import moe.ops  # noqa: F401
    for name in ("ep_dispatch", "ep_combine"):
        assert hasattr(torch.ops.harness, name)
        assert str(getattr(torch.ops.harness, name).default) == f"harness.{name}.default"


def test_unknown_dispatcher_is_a_value_error_before_any_group() -> None:
    with pytest.raises(ValueError, match="choose one of alltoall, deepep, hybridep"):
        resolve_dispatcher("deep_ep", False, None, 64)


def test_backend_ops_resolve_with_fake_implementations() -> None:
    for name in ("deepep.dispatch", "deepep.combine", "hybridep.dispatch", "hybridep.combine"):
        namespace, op = name.split(".")
        assert getattr(getattr(torch.ops, namespace), op).default in SAC_SAVE_OPS, name
    with FakeTensorMode(shape_env=ShapeEnv()):
        x = torch.empty(5, 64, dtype=torch.bfloat16)
        recv_x, recv_ids, recv_weights, handle_id = torch.ops.deepep.dispatch(
            x, torch.empty(5, 2, dtype=torch.int64), torch.empty(5, 2), 8, "group")
        assert recv_x.dtype == torch.bfloat16 and recv_ids.shape[1] == 2 and recv_weights.dtype == torch.float32
        assert handle_id.shape == () and handle_id.device.type == "cpu"
        recv_x, probs, local_map, _ = torch.ops.hybridep.dispatch(
            x, torch.empty(5, 8, dtype=torch.bool), torch.empty(5, 8), 4, "group")
        assert probs.shape[1] == 4 and local_map.dtype == torch.bool and recv_x.shape[0] == probs.shape[0]
        for backend in ("deepep", "hybridep"):
            combine = getattr(torch.ops, backend).combine
            assert combine(recv_x, handle_id, 5, "group").shape == (5, 64)
