"""DeepEP and HybridEP through their registered ops (torch.ops.deepep.* / torch.ops.hybridep.*),
on CPU with the strict `deep_ep` emulation of tests/fake_deep_ep over gloo.

One spawn of 4 ranks runs every case (CPU is scarce), in bf16, the only dtype the kernels move:
- parity with alltoall, losses and every gradient bitwise: qwen3_moe and deepseek_v3 at EP=4 and
  EP=2 (2 data-parallel pairs) under selective AC, and pp=2 x ep=2 Interleaved1F1B under it;
- selective AC saves the ops: in backward the buffer runs only the backward kernels, never the
  forward's again (a policy that saves nothing replays them: the control);
- handles are released after every backward and after a no-grad forward; one buffer per process
  serves every layer and both interleaved stages of a rank;
- HybridEP over two NVLink domains of 2 ranks (this rank's probability columns are not its EP
  rank's), and its backward's cached dispatch needs no stream synchronization;
- fp32 hidden states and an EP group spanning hosts are refused with a reason;
- the start-up summary lists the ops as saved.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from harness.loss import token_loss_sum
from harness.model_parts import decoder_layers
from harness.models import build_meta_model, load_config
from tests.deep_ep_emulation import cuda_reported, emulated_deep_ep, ep_mesh
from tests.moe_common import batch, canonical, parallelize_ep
from tests.multiproc import run_ranks

WORLD = 4
PRESETS = ("qwen3_moe", "deepseek_v3")
BACKENDS = ("deepep", "hybridep")
BUFFERS = {"deepep": "Buffer", "hybridep": "HybridEPBuffer"}


def _grads(modules) -> dict[str, torch.Tensor]:
    return {canonical(n): (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).clone()
            for m in modules for n, p in m.named_parameters() if p.grad is not None}


def _step(deep_ep, preset: str, ep: int, backend: str, checkpointing: str | None) -> dict:
    """One forward and backward of this rank's rows; the buffer's kernel calls in each phase."""
    config = load_config(preset, None)
    mesh = ep_mesh(ep, WORLD)
    inputs, labels = batch(config.vocab_size, rows=2 * ep)
    mine = slice(mesh.get_local_rank(), None, ep)
    with cuda_reported():
        model = build_meta_model(config)
        experts = parallelize_ep(model, mesh, backend, checkpointing, torch.bfloat16)
    dispatcher = experts[0]._expert_parallel.dispatcher
    assert dispatcher.name == backend, experts[0]._expert_parallel.dispatcher_reason
    buffer_cls = getattr(deep_ep, BUFFERS.get(backend, "Buffer"))

    def counters() -> Counter:
        return Counter(buffer_cls.calls) + Counter(stream_syncs=deep_ep.HybridEPBuffer.stream_syncs)

    start = counters()
    loss = token_loss_sum(model(inputs[mine]).logits.float(), labels[mine]) / labels.numel()
    forward = counters()
    loss.backward()
    backward = counters()
    return dict(loss=loss.item(), grads=_grads([model]), moe_layers=len(experts),
                forward=dict(forward - start), backward=dict(backward - forward))


def _pipeline(deep_ep, preset: str, backend: str) -> dict:
    """pp=2 x ep=2, Interleaved1F1B (two stages per rank), selective AC, 2 microbatches."""
    from harness.pipeline_stage import stage_builder
    from parallel.pipeline import pipeline_model

    config = load_config(preset, None)
    meshes = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    inputs, labels = batch(config.vocab_size, rows=8)
    mine = slice(meshes["ep"].get_local_rank(), None, 2)
    model = build_meta_model(config)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits.float(), target) / labels.numel()

    buffer_cls = getattr(deep_ep, BUFFERS.get(backend, "Buffer"))
    created = buffer_cls.created
    with cuda_reported():
        plan = pipeline_model(stage_builder(model), len(decoder_layers(model)), meshes["pp"],
                              schedule="Interleaved1F1B", n_microbatches=2, stages_per_rank=2, layers_per_stage=None,
                              parallelize_fn=partial(parallelize_ep, mesh=meshes["ep"], dispatcher=backend,
                                                     checkpointing="selective", dtype=torch.bfloat16),
                              device="cpu", loss_fn=loss_fn, microbatch_shape=(2, inputs.shape[1]),
                              activation_dtype=torch.bfloat16)
    loss = plan.step(inputs[mine], labels[mine])
    return dict(loss=None if loss is None else loss.item(), grads=_grads(plan.stage_modules),
                buffers=buffer_cls.created - created)


def _refusals(deep_ep) -> dict[str, str]:
    from moe.dispatch import resolve_dispatcher

    mesh = ep_mesh(2, WORLD)
    found = {}
    with cuda_reported():
        dispatcher, _ = resolve_dispatcher("deepep", True, mesh.get_group(), 64)
    try:
        dispatcher.dispatch(torch.randn(3, 64), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), 8)
    except ValueError as exc:
        found["fp32"] = str(exc)
    with cuda_reported(), mock.patch("socket.gethostname", return_value=f"host{dist.get_rank()}"):
        found["hosts"] = resolve_dispatcher("deepep", False, mesh.get_group(), 64)[1]
    return found


def _summary() -> list[str]:
    from harness.config import load_config as load_recipe
    from harness.summary import startup_summary
    from harness.validation import validate

    cfg = load_recipe(None, ["--model.preset=qwen3_moe", "--parallel.pp=2", "--parallel.dp_shard=2",
                             "--parallel.ep=2", "--ac.mode=selective"])
    plan = validate(cfg, WORLD)
    return startup_summary(cfg, plan, load_config("qwen3_moe", None), "Qwen3MoeForCausalLM", 0, [], 0, "deepep")


def _all_cases(rank: int, world: int) -> dict:
    deep_ep = emulated_deep_ep()
    from moe.deep_ep_runtime import _HANDLES as handles

    results: dict = {"steps": {}, "pipeline": {}}
    for ep in (4, 2):
        for preset in PRESETS:
            for backend in ("alltoall", *BACKENDS):
                results["steps"][(ep, preset, backend)] = _step(deep_ep, preset, ep, backend, "selective")
                assert len(handles) == 0
    results["control"] = _step(deep_ep, "qwen3_moe", 4, "deepep", "recompute_all")
    results["no_checkpointing"] = _step(deep_ep, "deepseek_v3", 4, "hybridep", None)
    results["handles_after_backward"] = len(handles)
    with cuda_reported():
        model = build_meta_model(load_config("qwen3_moe", None))
        parallelize_ep(model, ep_mesh(4, WORLD), "deepep", None, torch.bfloat16)
    with torch.no_grad():
        model(batch(256, rows=1)[0])
    results["handles_after_no_grad"] = len(handles)
    for preset in PRESETS:
        for backend in ("alltoall", *BACKENDS):
            results["pipeline"][(preset, backend)] = _pipeline(deep_ep, preset, backend)
    results["refusals"] = _refusals(deep_ep)
    results["summary"] = _summary()
    return results


_RESULTS: list[dict] = []


def _results() -> list[dict]:
    if not _RESULTS:
        _RESULTS.extend(run_ranks(_all_cases, WORLD, timeout=900))
    return _RESULTS


def _assert_same(case, mine: dict, reference: dict) -> None:
    assert mine["loss"] == reference["loss"], (case, mine["loss"], reference["loss"])
    assert mine["grads"].keys() == reference["grads"].keys(), case
    for name, grad in reference["grads"].items():
        assert torch.equal(mine["grads"][name], grad), (case, name, (mine["grads"][name] - grad).abs().max())


def test_deepep_and_hybridep_match_alltoall_bitwise_under_selective_ac() -> None:
    for results in _results():
        for (ep, preset, backend), step in results["steps"].items():
            if backend != "alltoall":
                _assert_same((ep, preset, backend), step, results["steps"][(ep, preset, "alltoall")])
                assert step["grads"], (ep, preset, backend)


def test_pipeline_interleaved_matches_alltoall_and_shares_one_buffer() -> None:
    for results in _results():
        for (preset, backend), run in results["pipeline"].items():
            _assert_same((preset, backend), run, results["pipeline"][(preset, "alltoall")])
            if backend != "alltoall":
                # Two interleaved stages, every MoE layer of both: one buffer per process.
                assert run["buffers"] == 1, (preset, backend, run["buffers"])


def test_selective_ac_recompute_never_calls_the_buffer() -> None:
    for results in _results():
        for (ep, preset, backend), step in results["steps"].items():
            if backend == "alltoall":
                continue
            layers = step["moe_layers"]
            # Backward runs the backward kernels only: a combine for each dispatch and a cached
            # dispatch for each combine; the forward's layout and dispatch are not replayed.
            assert {k: v for k, v in step["backward"].items() if v} == {"dispatch": layers, "combine": layers}, \
                (ep, preset, backend, step)
            assert step["forward"]["dispatch"] == layers and step["forward"]["combine"] == layers
        # Control: a policy that saves nothing replays each layer's layout and dispatch in backward
        # (and its combine unless the replay stops early), on top of the backward kernels.
        control = results["control"]
        layers = control["moe_layers"]
        assert control["backward"]["get_dispatch_layout"] == layers and control["backward"]["dispatch"] == 2 * layers


def test_handles_are_released_and_hybridep_backward_does_not_sync() -> None:
    for results in _results():
        assert results["handles_after_backward"] == 0 and results["handles_after_no_grad"] == 0
        for step in [s for (_, _, backend), s in results["steps"].items() if backend == "hybridep"] \
                + [results["no_checkpointing"]]:
            # Only a forward dispatch, before the received count is known, synchronizes.
            assert step["forward"]["stream_syncs"] == step["moe_layers"], step["forward"]
            assert "stream_syncs" not in step["backward"], step["backward"]


def test_fp32_and_cross_host_groups_are_refused_with_the_reason() -> None:
    for results in _results():
        refusals = results["refusals"]
        assert refusals["fp32"].startswith("moe.dispatcher=deepep: the kernels move bfloat16 hidden states only")
        assert refusals["hosts"].startswith("deepep: EP group of 2 ranks spans 2 hosts") and \
            refusals["hosts"].endswith("-> alltoall")


def test_summary_lists_the_backend_ops_as_saved() -> None:
    summary = "\n".join(_results()[0]["summary"])
    saved = next(line for line in summary.splitlines() if "saved when seen:" in line)
    for op in ("harness.ep_dispatch", "harness.ep_combine", "deepep.dispatch", "deepep.combine",
               "hybridep.dispatch", "hybridep.combine"):
        assert op in saved, (op, saved)
