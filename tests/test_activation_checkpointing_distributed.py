"""AC on real gloo ranks: FSDP2-sharded HF Llama, and collectives saved (never rerun) by SAC."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.fsdp import fully_shard

from harness.loss import token_loss_sum
from harness.materialize import canonical_name, materialize
from harness.model_parts import decoder_layers
from harness.models import build_meta_model, load_config, reference_model
from parallel.activation_checkpointing import apply_activation_checkpointing
from tests.ac_helpers import OpRecorder, inner
from tests.multiproc import run_ranks

MODES = ("none", "full", "selective", "submodule")


def _sharded_grads(config, reference: nn.Module, mode: str, input_ids: torch.Tensor, total_tokens: int,
                   world_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = build_meta_model(config)
    layers = decoder_layers(model)
    apply_activation_checkpointing(model, layers, mode)  # AC first, then FSDP
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    materialize(model, reference, "cpu")
    logits = model(input_ids=input_ids[:, :-1]).logits
    loss = token_loss_sum(logits, input_ids[:, 1:]) / total_tokens
    # FSDP averages gradients over ranks; the one-process gradient is their sum.
    (loss * world_size).backward()
    return loss.detach(), {canonical_name(n): p.grad.full_tensor() for n, p in model.named_parameters()}


def _fsdp_case(rank: int, world_size: int) -> None:
    config = load_config("llama", None)
    reference = reference_model(config, seed=0)
    batch = torch.randint(0, config.vocab_size, (2 * world_size, 33), generator=torch.Generator().manual_seed(1))
    total_tokens = batch[:, 1:].numel()
    token_loss_sum(reference(input_ids=batch[:, :-1]).logits, batch[:, 1:]).div(total_tokens).backward()
    single = {n: p.grad for n, p in reference.named_parameters()}

    local = batch.chunk(world_size)[rank]
    results = {mode: _sharded_grads(config, reference, mode, local, total_tokens, world_size) for mode in MODES}
    base_loss, base = results["none"]
    for mode in MODES[1:]:
        loss, grads = results[mode]
        assert torch.equal(loss, base_loss), mode
        differing = [n for n in base if not torch.equal(base[n], grads[n])]
        assert not differing, f"{mode}: gradients differ bitwise from no-AC FSDP: {differing[:5]}"
    assert base.keys() == single.keys()
    for name, grad in base.items():
        torch.testing.assert_close(grad, single[name], rtol=1e-5, atol=1e-5, msg=name)


def test_fsdp2_llama_every_mode_matches_no_ac_bitwise() -> None:
    run_ranks(_fsdp_case, 2)


class CollectiveBlock(nn.Module):
    """Linear -> all-to-all -> ReLU -> reduce-scatter -> Linear, with autograd-aware
    functional collectives (the in-place c10d ones give wrong gradients under SAC)."""

    def __init__(self, width: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group
        self.up = nn.Linear(width, width, bias=False)
        self.down = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = funcol.all_to_all_single_autograd(self.up(x), None, None, self.group)
        x = funcol.reduce_scatter_tensor_autograd(torch.relu(x), "sum", 0, self.group)
        return self.down(x)


def _collective_case(rank: int, world_size: int) -> dict[str, int]:
    torch.manual_seed(0)
    reference = nn.Sequential(CollectiveBlock(8, dist.group.WORLD))
    x = torch.randn(4 * world_size, 8, generator=torch.Generator().manual_seed(rank))
    reference(x).square().sum().backward()
    counts = {}
    for mode in ("full", "selective"):
        model = nn.Sequential(CollectiveBlock(8, dist.group.WORLD))
        model.load_state_dict(reference.state_dict())
        apply_activation_checkpointing(model, model, mode)
        recorder = OpRecorder()
        recorder.watch(inner(model[0]))
        with recorder:
            model(x).square().sum().backward()
        for name, param in model.named_parameters():
            expected = reference.get_parameter(canonical_name(name)).grad
            assert torch.equal(param.grad, expected), (mode, name)
        for op in ("all_to_all_single", "reduce_scatter_tensor"):
            key = f"_c10d_functional.{op}.default"
            assert recorder.counts["forward"][key] == 1, (mode, key, recorder.counts["forward"])
            counts[f"{mode}:{op}"] = recorder.counts["recompute"][key]
    return counts


def test_collectives_saved_by_selective_ac_not_rerun() -> None:
    for counts in run_ranks(_collective_case, 2):
        # Full AC reruns both collectives (so the recorder sees reruns); SAC replays them.
        assert counts == {"full:all_to_all_single": 1, "full:reduce_scatter_tensor": 1,
                          "selective:all_to_all_single": 0, "selective:reduce_scatter_tensor": 0}
