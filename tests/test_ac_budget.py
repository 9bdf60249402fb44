"""ac.mode=budget: measured activation memory fits the budget, numerics stay bitwise, the plan
follows the budget, heterogeneous layers are told apart, and the launcher runs and refuses it."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache

import pytest
import torch

from harness.loss import token_loss_sum
from harness.model_parts import decoder_layers
from harness.models import build_meta_model, load_config, reference_model
from parallel.ac_budget import (BUDGET_MODES, LayerCost, StepShape, apply_budget_plan, choose_plan, greedy_sequence,
                                measure_layers)
from tests.ac_helpers import assert_bitwise, lm_loss_and_grads
from tests.bench.ac_report import peak_activation_bytes

MiB = 2**20
SHAPE = StepShape(rows=4, seq_len=128, dtype=torch.float32, device_type="cpu")


@lru_cache(maxsize=None)
def _llama() -> tuple:
    """The tiny llama's config, meta model and measurement."""
    config = load_config("llama", None)
    model = build_meta_model(config)
    return config, model, measure_layers(model, decoder_layers(model), SHAPE, token_loss_sum)


@lru_cache(maxsize=None)
def _plan(budget_bytes: int):
    config, model, measurement = _llama()
    return choose_plan(model, decoder_layers(model), budget_bytes, SHAPE, token_loss_sum, measurement=measurement)


def _between(fraction: float) -> int:
    peaks = _llama()[2].uniform_peak_bytes
    return int(peaks["full"] + fraction * (peaks["none"] - peaks["full"]))


def _input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (SHAPE.rows, SHAPE.seq_len + 1), generator=torch.Generator().manual_seed(0))


def test_measured_activation_memory_fits_the_budget_and_mixes_modes() -> None:
    config = _llama()[0]
    for fraction in (0.3, 0.55, 0.8):
        budget = _between(fraction)
        plan = _plan(budget)
        assert plan.predicted_bytes <= budget
        assert len(set(plan.layer_modes)) > 1, plan.layer_modes  # between uniform modes: a mix
        model = reference_model(config, seed=0)
        apply_budget_plan(model, decoder_layers(model), plan.layer_modes)
        measured = peak_activation_bytes(model, _input_ids(config.vocab_size))
        assert measured <= budget, (plan.describe(), measured / MiB)
        # The prediction is the same step on fake tensors: within 2% of the measurement.
        assert abs(measured - plan.predicted_bytes) <= 0.02 * measured, (plan.describe(), measured / MiB)


def test_budget_plan_is_bitwise_no_ac_over_two_steps() -> None:
    config = _llama()[0]
    plan = _plan(_between(0.55))
    assert set(plan.layer_modes) >= {"none"} and set(plan.layer_modes) - {"none"}
    reference, model = reference_model(config, seed=0), reference_model(config, seed=0)
    apply_budget_plan(model, decoder_layers(model), plan.layer_modes)
    input_ids = _input_ids(config.vocab_size)
    for _ in range(2):
        expected_loss, expected = lm_loss_and_grads(reference, input_ids)
        loss, grads = lm_loss_and_grads(model, input_ids)
        assert torch.equal(expected_loss, loss)
        assert_bitwise(expected, grads)
        with torch.no_grad():
            for net in (reference, model):
                for p in net.parameters():
                    p -= 0.1 * p.grad


def _recompute(costs: list[LayerCost], modes: tuple[str, ...]) -> float:
    return sum(cost.recompute_cost[mode] for cost, mode in zip(costs, modes))


def test_plan_gets_cheaper_as_the_budget_grows() -> None:
    costs, peaks = _llama()[2].layers, _llama()[2].uniform_peak_bytes
    plans = [_plan(_between(fraction)) for fraction in (0.0, 0.3, 0.55, 0.8)]
    spent = [_recompute(costs, plan.layer_modes) for plan in plans]
    assert spent == sorted(spent, reverse=True), [p.describe() for p in plans]
    assert _plan(peaks["none"] * 10).layer_modes == ("none",) * len(costs)
    with pytest.raises(ValueError, match="smallest predicted activation memory"):
        _plan(peaks["full"] // 2)


def test_greedy_takes_the_most_bytes_per_recompute_cost_first() -> None:
    cheap_selective = LayerCost(kept_bytes={"none": 100, "selective": 20, "full": 0},
                                recompute_cost={"none": 0.0, "selective": 1.0, "full": 10.0})
    costly_selective = LayerCost(kept_bytes={"none": 100, "selective": 90, "full": 0},
                                 recompute_cost={"none": 0.0, "selective": 5.0, "full": 6.0})
    assert greedy_sequence([cheap_selective, costly_selective]) == [
        ("none", "none"),
        ("selective", "none"),  # 80 bytes per unit of cost
        ("selective", "full"),  # 100 / 6
        ("full", "full"),  # 20 / 9
    ]


def test_dense_and_moe_layers_get_their_own_predictions() -> None:
    config = load_config("qwen3_moe", None, dict(mlp_only_layers=[0, 2]))
    model = build_meta_model(config)
    costs = measure_layers(model, decoder_layers(model), SHAPE, token_loss_sum).layers
    dense, moe = costs[0], costs[1]
    assert costs[2] == dense and costs[3] == moe
    assert dense.kept_bytes["none"] != moe.kept_bytes["none"]
    assert dense.recompute_cost["full"] != moe.recompute_cost["full"]
    for cost in costs:  # each mode keeps less than the one before it
        kept = [cost.kept_bytes[mode] for mode in BUDGET_MODES]
        assert kept == sorted(kept, reverse=True)


def _launch(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model:\n  preset: llama\ntrain:\n  steps: 1\n  global_batch_size: 4\n  micro_batch_size: 2\n"
                      "  seq_len: 64\ndata:\n  max_bytes: 100000\nparallel:\n  dp_shard: 2\n")
    return subprocess.run([sys.executable, "-m", "launch", "--config", str(recipe), f"--run.dir={tmp_path / 'run'}",
                           *overrides], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_launcher_refuses_a_budget_no_plan_meets(tmp_path) -> None:
    result = _launch(tmp_path, "--ac.mode=budget", "--ac.budget_mib=0.5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ac.budget_mib=0.5: too small"), result.stderr
    assert "every layer fully checkpointed, is" in lines[0]
    assert not (tmp_path / "run").exists()


def test_verbose_prints_the_libraries_warnings_after_the_error(tmp_path) -> None:
    """The budget's measurement makes torch warn (its module tracker sees a checkpointed layer
    entered again): never before the error, and only when asked."""
    result = _launch(tmp_path, "--verbose", "--ac.mode=budget", "--ac.budget_mib=0.5")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[0].startswith("error: ac.budget_mib=0.5: too small"), result.stderr
    assert any("UserWarning" in line for line in lines[1:]), result.stderr


def test_launcher_trains_under_a_budget_on_two_ranks(tmp_path) -> None:
    # Under tp=2 each worker validates (the fake rank's step) before it joins the process group,
    # then trains and saves its shards.
    result = _launch(tmp_path, "--ac.mode=budget", "--ac.budget_mib=2.5", "--parallel.dp_shard=1", "--parallel.tp=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = (result.stdout + result.stderr).splitlines()
    assert not any("Warning" in line for line in output), output
    assert "UserWarning" in (tmp_path / "run" / "logs" / "launch.log").read_text()
    summary = [line for line in output if line.startswith("activation checkpointing:")]
    assert len(summary) == 1 and summary[0].startswith("activation checkpointing: budget 2.5 MiB -> "), summary
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("family", ["qwen3_next", "gpt_oss", "gemma2"])
def test_prediction_is_the_measurement_across_families(family: str) -> None:
    """The fake step is the real one: within 2% under every uniform mode, also for families whose
    code writes in place into outputs selective AC saved (GPT-OSS's expert bias, Qwen3-Next)."""
    from parallel.ac_budget import simulate
    from tests.families import HAND_SHRUNK, hand_shrunk_config, tiny_config as family_config

    config = hand_shrunk_config(family) if family in HAND_SHRUNK else family_config(family)
    shape = StepShape(rows=2, seq_len=32, dtype=torch.float32, device_type="cpu")
    input_ids = torch.randint(0, config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    for mode in ("none", "selective", "full"):
        meta = build_meta_model(config)
        predicted = simulate(meta, decoder_layers(meta), [mode] * config.num_hidden_layers, shape,
                             token_loss_sum).peak_bytes
        model = reference_model(config, seed=0)
        apply_budget_plan(model, decoder_layers(model), [mode] * config.num_hidden_layers)
        measured = peak_activation_bytes(model, input_ids)
        assert abs(measured - predicted) <= 0.02 * measured, (mode, predicted, measured)
