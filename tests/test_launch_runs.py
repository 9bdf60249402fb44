"""Run folders end to end: a run, a worker failure reported in one line, the same command
resuming, nothing left to train, a foreign checkpoint refused before any worker starts, and a
non-finite loss (a diverging run, its resume, weights with a NaN) stopping the job in one line.

Real launcher processes on a 2-rank gloo job; the run-folder tests reuse the first run's folder,
the non-finite ones start their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from harness.config import ConfigError, load_config
from harness.models import load_config as load_model_config, reference_model
from harness.run_identity import IDENTITY_FILE, identity_file_text, run_identity
from harness.validation import validate

ROOT = Path(__file__).resolve().parent.parent
RECIPE = """
model: {preset: llama}
train: {steps: 2, global_batch_size: 4, micro_batch_size: 2, seq_len: 32, warmup_steps: 1}
data: {max_bytes: 100000}
parallel: {dp_shard: 2}
logging: {progress: false}
"""


def _launch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "launch", "--config", "tiny.yaml", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """The recipe run once: runs/tiny holds its recipe, metrics, plot and step-2 checkpoint."""
    cwd = tmp_path_factory.mktemp("runs")
    (cwd / "tiny.yaml").write_text(RECIPE)
    done = _launch(cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd


def test_run_folder_holds_every_output(first_run):
    folder = first_run / "runs" / "tiny"
    assert {"recipe.yaml", "metrics.jsonl", "metrics.png", "checkpoints"} <= {p.name for p in folder.iterdir()}
    assert _steps(folder / "metrics.jsonl") == [1, 2]
    # The copy is resolved: a default the recipe left out is written as what ran.
    copy = load_config(str(folder / "recipe.yaml"))
    assert copy.run.name == "tiny" and copy.parallel.dp_shard == 2 and copy.ac.mode == "none"
    identity = json.loads((folder / "checkpoints" / "step_0000002" / IDENTITY_FILE).read_text())["identity"]
    assert identity["model.model_type"] == "llama" and identity["train.seq_len"] == 32


def test_worker_failure_is_one_line_then_the_same_command_resumes(first_run):
    folder = first_run / "runs" / "tiny"
    # A file where rank 0 must create the step-3 checkpoint folder: rank 0 raises, rank 1 is
    # left waiting in the next collective and is stopped by the agent.
    blocker = folder / "checkpoints" / "step_0000003.tmp"
    blocker.write_text("in the way")
    failed = _launch(first_run, "--train.steps=3")
    log = folder / "logs" / "rank_00000.log"
    assert _one_error_line(failed) == (f"error: rank 0 failed: FileExistsError: [Errno 17] File exists: "
                                       f"'{blocker.relative_to(first_run)}' (full log: {log.relative_to(first_run)})")
    assert "Traceback" in log.read_text()
    blocker.unlink()

    resumed = _launch(first_run, "--train.steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from runs/tiny/checkpoints/step_0000002 at step 2" in resumed.stdout + resumed.stderr
    assert _steps(folder / "metrics.jsonl") == [1, 2, 3]


def test_nothing_left_to_train_exits_0_and_touches_nothing(first_run):
    folder = first_run / "runs" / "tiny"
    before = _snapshot(folder)
    done = _launch(first_run, "--train.steps=2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("nothing to train (raise train.steps, or delete runs/tiny/checkpoints "
                                        "to start over)")
    assert _snapshot(folder) == before


def test_another_model_in_the_same_folder_is_refused_before_any_worker(first_run):
    folder = first_run / "runs" / "tiny"
    before = _snapshot(folder)
    done = _launch(first_run, "--model.preset=qwen3_moe")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: checkpoint.dir=runs/tiny/checkpoints: checkpoint {_newest(folder)} is another run "
        '(model.model_type is "llama" there, "qwen3_moe" here); choose another --run.name, or start from its '
        f"weights with --checkpoint.resume_from=runs/tiny/checkpoints/{_newest(folder)} "
        "--checkpoint.load_weights_only=true"]
    assert _snapshot(folder) == before


def _newest(folder: Path) -> str:
    return sorted(p.name for p in (folder / "checkpoints").iterdir())[-1]


def _checkpoints(cwd: Path) -> list[str]:
    folder = cwd / "runs" / "tiny" / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# One step at this rate leaves weights whose next forward overflows.
DIVERGING = ["--train.steps=6", "--checkpoint.every=1", "--train.lr=1e30"]


def test_a_diverging_run_stops_in_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    assert _one_error_line(_launch(tmp_path, *DIVERGING)) == (
        "error: step 2: loss is nan (grad_norm nan); training stopped without applying that step, the newest "
        "checkpoint is runs/tiny/checkpoints/step_0000001: lower train.lr and run the same command to resume from it")
    assert _checkpoints(tmp_path) == ["step_0000001"]
    assert _steps(tmp_path / "runs" / "tiny" / "metrics.jsonl") == [1]
    dcp_to_torch_save(tmp_path / "runs" / "tiny" / "checkpoints" / "step_0000001", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    assert all(torch.isfinite(value).all() for value in saved["model"].values())

    # The same command resumes that checkpoint, whose weights are finite but already too large
    # for the next forward: the line says so, and nothing is saved over it.
    assert _one_error_line(_launch(tmp_path, *DIVERGING)) == (
        "error: step 2: loss is nan (grad_norm nan); training stopped without applying that step, the newest "
        "checkpoint is runs/tiny/checkpoints/step_0000001: the weights of runs/tiny/checkpoints/step_0000001 "
        "already give it; start from an earlier checkpoint (--checkpoint.resume_from=PATH) with a lower train.lr")
    assert _checkpoints(tmp_path) == ["step_0000001"]


def test_weights_with_a_nan_stop_the_first_step_in_one_line(tmp_path):
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    model = reference_model(load_model_config("llama", None), seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "nan_llama")
    done = _launch(tmp_path, f"--model.path={tmp_path / 'nan_llama'}")
    assert _one_error_line(done) == (
        "error: step 1: loss is nan (grad_norm nan); training stopped without applying that step, no checkpoint "
        f"was saved: the weights at model.path={tmp_path / 'nan_llama'} already give it: check them")
    assert _checkpoints(tmp_path) == []


# Validation alone, on a checkpoint written in this process with a real run.json.

def _checkpoint_of(path: Path, *overrides: str) -> None:
    cfg = load_config(None, list(overrides))
    model_config = load_model_config(cfg.model.preset, cfg.model.path, cfg.model.overrides)
    dcp.save({"w": torch.zeros(4)}, checkpoint_id=str(path))
    (path / IDENTITY_FILE).write_text(identity_file_text(run_identity(cfg, model_config), cfg.to_dict()))


@pytest.mark.parametrize("overrides, difference", [
    (["--model.overrides.num_hidden_layers=2"], "model.num_hidden_layers is 4 there, 2 here"),
    (["--data.max_bytes=5000"], "data.max_bytes is 4000000 there, 5000 here"),
    (["--train.seed=1"], "train.seed is 0 there, 1 here"),
])
def test_first_difference_is_named(tmp_path, overrides, difference):
    _checkpoint_of(tmp_path / "step_0000004")
    with pytest.raises(ConfigError) as error:
        validate(load_config(None, [f"--checkpoint.dir={tmp_path}", *overrides]), 1)
    assert f"checkpoint step_0000004 is another run ({difference}); choose another --run.name" in str(error.value)


def test_layout_and_schedule_changes_resume(tmp_path):
    _checkpoint_of(tmp_path / "step_0000004")
    validate(load_config(None, [f"--checkpoint.dir={tmp_path}", "--parallel.dp_shard=2", "--train.steps=50",
                                "--train.lr=1e-4", "--ac.mode=full"]), 2)


def test_weights_only_compares_the_model_alone(tmp_path):
    _checkpoint_of(tmp_path / "step_0000004")
    other = [f"--checkpoint.resume_from={tmp_path / 'step_0000004'}", "--checkpoint.load_weights_only=true",
             f"--checkpoint.dir={tmp_path / 'mine'}"]
    validate(load_config(None, [*other, "--data.max_bytes=5000", "--train.seed=3"]), 1)
    with pytest.raises(ConfigError, match=r"is another model \(model.num_hidden_layers is 4 there, 2 here\)"):
        validate(load_config(None, [*other, "--model.overrides.num_hidden_layers=2"]), 1)


def test_a_checkpoint_that_records_no_identity_is_refused(tmp_path):
    dcp.save({"w": torch.zeros(4)}, checkpoint_id=str(tmp_path / "step_0000004"))
    with pytest.raises(ConfigError, match="does not record what it was trained as"):
        validate(load_config(None, [f"--checkpoint.dir={tmp_path}"]), 1)
