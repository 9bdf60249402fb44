"""Compiling each transformer block: the same losses and gradients as eager (inductor's fused
kernels round differently, so within 1e-4), with every activation-checkpointing mode and under
tensor and context parallel, each case asserting that dynamo compiled a graph (a block dynamo
gives up on runs eagerly and would pass unexamined); a machine without a C++ compiler is told so
instead of failing inside inductor."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from harness.loss import token_loss_sum
from harness.model_parts import decoder_layers
from harness.models import load_config, reference_model
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.compile import compile_layers, compile_unavailable_reason
from tests.layout_run import train_layout
from tests.multiproc import run_ranks
from tests.reference import reference_run, tiny_config

pytestmark = pytest.mark.skipif(compile_unavailable_reason("cpu") is not None, reason="no C++ compiler")


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _loss_and_grads(mode: str, compiled: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """The loss, every gradient by name, and how many graphs dynamo compiled for them."""
    before = _compiled_graphs()
    config = load_config("llama", None, {"num_hidden_layers": 2})
    model = reference_model(config, seed=0)
    layers = decoder_layers(model)
    apply_activation_checkpointing(model, layers, mode, enable_compile=compiled)
    if compiled:
        compile_layers(model, layers)
        assert all(type(layer).__name__ == "OptimizedModule" for layer in layers)
    ids = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    loss = token_loss_sum(model(input_ids=ids[:, :-1]).logits, ids[:, 1:]) / ids[:, 1:].numel()
    loss.backward()
    grads = {name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): p.grad
             for name, p in model.named_parameters()}
    return loss.item(), grads, _compiled_graphs() - before


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_compiled_blocks_match_eager(mode):
    eager_loss, eager_grads, _ = _loss_and_grads(mode, compiled=False)
    loss, grads, graphs = _loss_and_grads(mode, compiled=True)
    assert graphs > 0, "dynamo compiled no graph: the blocks ran eagerly"
    assert loss == pytest.approx(eager_loss, abs=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-4, rtol=1e-4, msg=name)


def test_missing_cpp_compiler_is_reported():
    # Inductor reads CXX when it is imported: ask a fresh interpreter.
    probe = "from parallel.compile import compile_unavailable_reason as r; print(r('cpu')); print(r('cuda'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ, "CXX": "/no/such/c++"}).stdout.splitlines()
    assert out[0].startswith("no C++ compiler for inductor") and out[1] == "None"


def test_selective_context_under_a_tracing_mode_is_sac_own_modes():
    """Checkpoint asserts, while AOTAutograd traces a compiled block, that `context_fn` returns
    two TorchDispatchModes; torch 2.11 calls it there outside dynamo (on CUDA under FSDP2: a
    BackendCompilerFailed). Under make_fx's proxy mode, as there, the harness's context must be
    SAC's own modes, not its eager wrappers."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import TorchDispatchMode

    from parallel.activation_checkpointing import make_selective_checkpoint_context_fn

    context_fn = make_selective_checkpoint_context_fn()
    assert not all(isinstance(mode, TorchDispatchMode) for mode in context_fn())  # eager: wrapped
    seen = []

    def traced(x: torch.Tensor) -> torch.Tensor:
        seen.extend(context_fn())
        return x + 1

    make_fx(traced)(torch.ones(2))
    assert len(seen) == 2 and all(isinstance(mode, TorchDispatchMode) for mode in seen), seen


def _train_each_compiled(rank: int, world_size: int, cfgs: list) -> list:
    """Per config: what `train_layout` returns, and the graphs dynamo compiled for it."""
    out = []
    for cfg in cfgs:
        before = _compiled_graphs()
        out.append((train_layout(rank, world_size, cfg), _compiled_graphs() - before))
    return out


def test_compiled_blocks_under_tensor_and_context_parallel_match_eager():
    # tp=2, without AC and with selective AC: each block holds DTensor parameters,
    # sequence-parallel norms and the hooks that gather and scatter the sequence, and the first
    # takes the vocabulary-parallel embeddings' all-reduced output (whose gradient a compiled
    # block once dropped). cp=2: each compiled block holds context parallel's attention (the
    # key/value all-gather's autograd function over functional collectives, the chunks' causal
    # biases) in one graph. Each against the one-process eager run.
    tp = ("--parallel.tp=2", "--parallel.dp_shard=1", "--train.compile=true", "--train.steps=2")
    cfgs = [tiny_config(*tp, "--ac.mode=none"), tiny_config(*tp, "--ac.mode=selective"),
            tiny_config("--parallel.cp=2", "--parallel.dp_shard=1", "--train.compile=true", "--train.steps=2")]
    references = [reference_run(cfg) for cfg in cfgs]
    for per_rank in run_ranks(_train_each_compiled, 2, cfgs, timeout=900):
        for cfg, ((losses, norms, _), graphs), (reference_losses, reference_norms, _) in zip(cfgs, per_rank,
                                                                                              references):
            layout = f"tp={cfg.parallel.tp} cp={cfg.parallel.cp} ac={cfg.ac.mode}"
            assert graphs > 0, f"{layout}: dynamo compiled no graph"
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), atol=1e-4, rtol=0,
                                       msg=lambda m: f"{layout}: {m}")
            torch.testing.assert_close(torch.tensor(norms), torch.tensor(reference_norms), atol=0, rtol=1e-4,
                                       msg=lambda m: f"{layout}: {m}")
