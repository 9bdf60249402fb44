"""Pipeline parallel reproduces the single-process run: losses of every step and the parameters
after a few AdamW steps, for every schedule, with FSDP2 over a data-parallel axis, with
selective activation checkpointing, and for an MoE model.

One process spawn runs several cases one after the other to keep the suite fast on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from harness.loss import count_tokens, token_loss_sum
from harness.materialize import materialize
from harness.model_parts import decoder_layers
from harness.models import build_meta_model, load_config, reference_model
from harness.pipeline_stage import stage_builder
from parallel.activation_checkpointing import apply_activation_checkpointing
from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelDims
from parallel.pipeline import SCHEDULES, pipeline_model
from tests.multiproc import run_ranks
from tests.reference import reference_step

SEED, STEPS, BATCH, SEQ, MICROBATCHES, LR = 0, 2, 8, 16, 4, 1e-2
# Adam turns ~1e-7 gradient noise (a different summation order) into ~1e-5 parameter noise at lr 1e-2.
ATOL_LOSS, ATOL_PARAM = 1e-5, 5e-5
# Routed experts see a few tokens each, so more of their gradient entries sit near Adam's eps and
# take the noise at full scale: 5.2e-5 seen on one qwen3_moe expert entry (1F1B) on one CPU model.
ATOL_PARAM_MOE = 1e-4

# (preset, schedule, AC mode, layers_per_stage)
Case = tuple[str, str, str, list[int] | None]


def _batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(STEPS):
        tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=gen)
        labels = tokens[:, 1:].clone()
        labels[:, :2] = -100  # ignored positions must stay out of the loss and the token count
        batches.append((tokens[:, :-1], labels))
    return batches


class _GlobalTokenLoss:
    """Microbatch loss as a share of the step mean: token-summed, divided by the global count."""

    def __init__(self) -> None:
        self.global_tokens = torch.ones(())

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, labels) / self.global_tokens


def _grad_norm(params: list[torch.Tensor]) -> float:
    """Over all ranks: every parameter (or FSDP shard of one) lives on exactly one rank."""
    local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
    squares = torch.stack([g.pow(2).sum() for g in local]).sum()
    dist.all_reduce(squares)
    return squares.sqrt().item()


def _reference(preset: str) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Losses and gradient norms per step, and the final parameters, of the one-process run."""
    config = load_config(preset, None)
    model = reference_model(config, SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    steps = [reference_step(model, optimizer, inputs, labels) for inputs, labels in _batches(config.vocab_size)]
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return [loss for loss, _ in steps], [norm for _, norm in steps], params


def _pipelined(rank: int, world_size: int, cases: list[Case], dp_shard: int) -> list:
    """Per case, in order: per-step losses and gradient norms (over all ranks), and the parameters
    this rank holds."""
    meshes = ParallelDims(pp=2, dp_shard=dp_shard, world_size=world_size).build_meshes("cpu")
    dp_rank, dp = meshes.dp.get_local_rank(), meshes.dp.size()
    results = []
    for case in cases:
        preset, schedule, ac_mode, layers_per_stage = case
        config = load_config(preset, None)
        reference = reference_model(config, SEED)

        def parallelize(stage: torch.nn.Module) -> None:
            layers = decoder_layers(stage)
            apply_activation_checkpointing(stage, layers, ac_mode)
            if dp_shard > 1:
                apply_fsdp(stage, list(layers.values()), meshes.fsdp, reshard_after_forward=False)
            materialize(stage, reference, "cpu")

        loss_fn = _GlobalTokenLoss()
        plan = pipeline_model(stage_builder(build_meta_model(config)), config.num_hidden_layers, meshes.pp, schedule=schedule, n_microbatches=MICROBATCHES,
                              stages_per_rank=None, layers_per_stage=layers_per_stage,
                              parallelize_fn=parallelize, device="cpu", loss_fn=loss_fn,
                              microbatch_shape=(BATCH // dp // MICROBATCHES, SEQ))
        params = [p for m in plan.stage_modules for p in m.parameters()]
        optimizer = torch.optim.AdamW(params, lr=LR)
        losses, norms = [], []
        for inputs, labels in _batches(config.vocab_size):
            loss_fn.global_tokens = count_tokens(labels).float()
            local = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
            loss = plan.step(inputs[local], labels[local])
            assert (loss is not None) == plan.has_last_stage
            # Only last-stage ranks hold a loss; their sum over dp ranks is the step's mean loss.
            total = loss if loss is not None else torch.zeros(())
            dist.all_reduce(total)
            losses.append(total.item())
            norms.append(_grad_norm(params))
            optimizer.step()
            optimizer.zero_grad()
        state = {}
        for module in plan.stage_modules:
            state.update(get_model_state_dict(module, options=StateDictOptions(full_state_dict=True)))
        results.append((losses, norms, state))
    return results


def _assert_parity(cases: list[Case], per_rank: list[list], atol_param: float = ATOL_PARAM) -> None:
    references = {preset: _reference(preset) for preset in {case[0] for case in cases}}
    for index, case in enumerate(cases):
        ref_losses, ref_norms, ref_params = references[case[0]]
        seen = set()
        for rank_results in per_rank:
            losses, norms, params = rank_results[index]
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=ATOL_LOSS, rtol=0,
                                       msg=lambda m: f"{case} losses: {m}")
            torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), atol=0, rtol=1e-5,
                                       msg=lambda m: f"{case} gradient norms: {m}")
            for name, value in params.items():
                torch.testing.assert_close(value, ref_params[name], atol=atol_param, rtol=0,
                                           msg=lambda m: f"{case} {name}: {m}")
                seen.add(name)
        assert seen == set(ref_params), f"{case}: parameters on no stage: {sorted(set(ref_params) - seen)}"


def test_every_schedule_matches_single_process_on_two_ranks():
    cases = [("llama", schedule, "none", None) for schedule in SCHEDULES]
    cases += [("llama", "1F1B", "none", [1, 3]), ("llama", "Interleaved1F1B", "none", [0, 2, 1, 1])]
    _assert_parity(cases, run_ranks(_pipelined, 2, cases, 1))


def test_moe_pipeline_matches_single_process():
    cases = [("qwen3_moe", "1F1B", "none", None), ("qwen3_moe", "DualPipeV", "none", None)]
    _assert_parity(cases, run_ranks(_pipelined, 2, cases, 1), atol_param=ATOL_PARAM_MOE)


@pytest.mark.parametrize("ac_mode", ["none", "selective"])
def test_pipeline_with_fsdp_matches_single_process(ac_mode):
    """pp=2 x dp_shard=2: FSDP2 per layer then root over each stage, gradients summed over shards."""
    cases = [("llama", "1F1B", ac_mode, None), ("llama", "Interleaved1F1B", ac_mode, None)]
    _assert_parity(cases, run_ranks(_pipelined, 4, cases, 2))
