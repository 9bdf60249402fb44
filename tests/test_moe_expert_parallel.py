"""EP=2 and EP=4 reproduce the single-process HF model: losses and every gradient (fp32), for
the gated [E, 2I, H] layout of the presets and GPT-OSS's transposed, biased experts with their
clamped SwiGLU (under selective AC, which the expert bias used to break).

Each rank feeds its own slice of the batch; the loss is summed over tokens and divided by
the global token count, so dense gradients summed over ranks and the expert gradients that
EP already gathers from every rank both equal the reference's.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from harness.loss import token_loss_sum
from harness.models import load_config
from tests.moe_common import SEED, batch, canonical, ep_model, full_grads, gpt_oss_config
from tests.layout_run import assert_matches_reference, train_layout
from tests.multiproc import run_ranks
from tests.reference import reference_grads, reference_run, tiny_config

PRESETS = ("qwen3_moe", "mixtral", "deepseek_v3")


def _compare_presets(rank: int, world: int) -> dict[str, tuple[float, float, float, int]]:
    results = {}
    cases = [(preset, load_config(preset, None), None) for preset in PRESETS]
    for name, config, checkpointing in [*cases, ("gpt_oss-sac", gpt_oss_config(), "selective")]:
        inputs, labels = batch(config.vocab_size)
        ref_loss, ref_grads = reference_grads(config, SEED, inputs, labels)
        model, _ = ep_model(config, world, checkpointing=checkpointing)
        mine = slice(rank, None, world)
        loss = token_loss_sum(model(inputs[mine]).logits, labels[mine]) / labels.numel()
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {canonical(n): g for n, g in full_grads(model).items()}
        assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
        worst = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
        scale = max(ref_grads[n].abs().max().item() for n in grads)
        results[name] = (abs(total.item() - ref_loss), worst, scale, len(grads))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_ep_matches_single_process_losses_and_grads(world: int) -> None:
    results = run_ranks(_compare_presets, world)[0]
    for preset, (loss_diff, grad_diff, grad_scale, count) in results.items():
        assert count > 0
        assert loss_diff < 1e-5, (preset, loss_diff)
        assert grad_diff < 1e-5 and grad_diff < 1e-4 * grad_scale, (preset, grad_diff, grad_scale)


def test_gpt_oss_through_the_trainer(tmp_path) -> None:
    # Biased, transposed experts sharded over ep and FSDP, selective AC, 3 optimizer steps.
    gpt_oss_config().save_pretrained(tmp_path)
    cfg = tiny_config(f"--model.path={tmp_path}", "--parallel.dp_shard=2", "--parallel.ep=2", "--ac.mode=selective")
    assert_matches_reference(run_ranks(train_layout, 2, cfg), reference_run(cfg))
