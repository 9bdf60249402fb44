"""`python -m launch plan`: the ranked table and its recipe, bad input, and the plan check of a
real gloo run (its line, and the parameter and optimizer bytes predicted exactly)."""

from __future__ import annotations

import logging
import re

import pytest
import torch
import yaml

from harness.config import load_config
from harness.layout_planner.activations import measure_profile
from harness.layout_planner.devices import named_device
from harness.layout_planner.plan_check import predict_run
from harness.layout_planner.planner import make_plan
from harness.loss import token_loss_sum
from harness.model_parts import decoder_layers
from harness.models import build_meta_model
from harness.validation import validate
from harness.trainer import train
from launch.cli import main
from parallel.ac_budget import BUDGET_MODES, StepShape, simulate
from tests.families import hand_shrunk_config
from tests.multiproc import run_ranks
from tests.reference import tiny_config

RECIPE = {"model": {"preset": "qwen3_moe"}, "data": {"max_bytes": 100_000},
          "train": {"seq_len": 32, "global_batch_size": 8, "micro_batch_size": 2}}


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return str(path)


def test_plan_ranks_layouts_and_writes_the_best_recipe(recipe, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    assert main(["plan", "--config", recipe, "--world", "4", "--device", "cpu", "--device-memory", "4GiB",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "measuring activations" in captured.err  # progress
    table = [line for line in captured.out.splitlines() if line.startswith("| 1 |")]
    assert len(table) == 1 and "| yes |" in table[0]
    best = yaml.safe_load(out.read_text())
    assert best["model"] == RECIPE["model"] and best["train"]["seq_len"] == 32
    written = load_config(str(out))
    validate(written, 4)  # the written recipe runs as is on 4 ranks
    overrides = next(line for line in captured.out.splitlines() if line.startswith("overrides: "))
    assert f"--parallel.dp_shard={written.parallel.dp_shard}" in overrides


@pytest.mark.parametrize("argv, expected", [
    (["--world", "4", "--device", "tpu9"], "error: --device tpu9: unknown device; choose one of h100, h200, cpu"),
    (["--world", "4", "--device-memory", "lots"], "error: --device-memory=lots: give a positive size with a unit"),
    (["--world", "4", "--device-memory", "4MiB"], "error: --device-memory=0.0GiB: no layout fits; the smallest"),
    (["--world", "3"], "error: --world 3: validation accepts no layout of this model on 3 ranks"),
])
def test_bad_input_is_one_line_and_exit_2(recipe, argv, expected, capsys):
    assert main(["plan", "--config", recipe, *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_no_fit_names_the_smallest_requirement(recipe, capsys):
    assert main(["plan", "--config", recipe, "--world", "2", "--device", "cpu", "--device-memory", "1MiB"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert " needs " in error and "GiB per rank" in error and "more memory" in error


def test_layer_kinds_measured_once_give_every_layer_its_own_measurement():
    """A hybrid (conv and attention layers): the prefix measurement, reused per kind, equals each
    layer's kept bytes in a fake step of the whole model."""
    config = hand_shrunk_config("lfm2")
    config.update(dict(num_hidden_layers=6, layer_types=["conv", "full_attention", "conv"] * 2))
    model = build_meta_model(config)
    profile = measure_profile(model, 16, torch.float32, lambda _: None)
    assert profile.kinds == 2
    shape = StepShape(rows=1, seq_len=16, dtype=torch.float32, device_type="cpu")
    for mode in BUDGET_MODES:
        whole = simulate(model, decoder_layers(model), [mode] * 6, shape, token_loss_sum)
        assert [cost.kept_bytes[mode] for cost in profile.layers] == whole.kept_bytes
        assert profile.kept([mode] * 6, list(range(6)), 1) + profile.remainder_bytes >= whole.peak_bytes * 0.95


def _train_logging(rank: int, world_size: int, cfg) -> tuple[list[str], dict]:
    """The run's log lines on this rank, and its last metrics row."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    trainer_log = logging.getLogger("harness.trainer")
    trainer_log.addHandler(handler)
    trainer_log.setLevel(logging.INFO)
    rows = train(cfg, validate(cfg, world_size))
    return [record.getMessage() for record in records], rows[-1]


CHECK_LINE = re.compile(r"plan check: peak memory per rank predicted (\d+) MiB, measured (\d+) MiB \(RSS growth "
                        r"since the build\) \([+-]\d+%\); step time predicted ([0-9.e+-]+) s, measured ([0-9.e+-]+) s "
                        r"\([+-]\d+%\)")


def test_plan_check_prints_predicted_and_measured_after_step_3(tmp_path):
    """Two pipeline stages of an MoE model: one line on rank 0 after step 3 with both numbers, and
    the parameter and optimizer bytes of the stage that needs most as predicted, to the byte."""
    cfg = tiny_config(f"--run.dir={tmp_path}", "--model.preset=qwen3_moe", "--parallel.pp=2",
                      "--parallel.dp_shard=1", "--parallel.pp_microbatches=2", "--logging.plan_check=true")
    (lines0, row0), (lines1, row1) = run_ranks(_train_logging, 2, cfg)
    checks = [line for line in lines0 if line.startswith("plan check:")]
    assert len(checks) == 1 and not any(line.startswith("plan check:") for line in lines1), lines0
    predicted_mib, measured_mib, predicted_s, measured_s = CHECK_LINE.fullmatch(checks[0]).groups()
    assert int(predicted_mib) > 0 and int(measured_mib) > 0 and float(predicted_s) > 0 and float(measured_s) > 0
    prediction = predict_run(cfg, validate(cfg, 2), 2, 2, named_device("cpu"))
    measured = (row0, row1)[prediction.rank]  # pp outermost: global rank = pipeline rank on 2 ranks
    measured_bytes = (measured["param_mib"] + measured["optimizer_mib"]) * 2**20
    assert prediction.state.param + prediction.state.optimizer == measured_bytes


def test_tensor_and_context_parallel_layouts_are_planned():
    """On 4 ranks of a dense model the plan weighs tp and cp layouts and prices their traffic; their
    state is split four ways as fsdp4's is, and cp2 keeps half of fsdp4's activations plus the
    gathered keys and values."""
    cfg = load_config(None, ["--model.preset=llama", "--train.seq_len=64", "--train.global_batch_size=8",
                             "--train.micro_batch_size=2"])
    device = named_device("cpu")
    plan = make_plan(cfg, 4, 4, device, lambda _: None, wanted=10**6)  # every accepted layout
    by_layout = {(p.layout.describe(), p.layout.micro_batch_size, p.layout.ac_mode): p for p in plan.predictions}
    tp2, cp2, fsdp4 = (by_layout[(name, 2, "none")] for name in ("fsdp2 tp2", "fsdp2 cp2", "fsdp4"))
    assert "tp" in tp2.times and "cp" in cp2.times and not {"tp", "cp"} & set(fsdp4.times)
    assert (cp2.state.param, cp2.state.optimizer) == (fsdp4.state.param, fsdp4.state.optimizer)  # FSDP: dp_shard x cp
    assert tp2.state.param == pytest.approx(fsdp4.state.param, rel=0.02)  # all but the norms split over tp
    kv = 2 * 64 * plan.facts.kv_width * 4 / 2 * len(plan.facts.state.layers)  # rows x seq x width x fp32 x (cp-1)/cp
    assert cp2.activation_bytes == pytest.approx(fsdp4.activation_bytes / 2 + kv, rel=1e-6)
