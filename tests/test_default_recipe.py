"""The default recipe (what `make train` runs) end to end, with fewer steps: Qwen3-MoE on 4 gloo
ranks, pp=2 x dp_shard=2, ep=2, selective AC, Interleaved1F1B."""

import json
import math
import os
import subprocess
import sys

import pytest

STEPS = 4
# First on the workers' path: DeepEP absent whatever this machine has, so the fallback shows.
NO_DEEP_EP = os.path.join(os.path.dirname(__file__), "no_deep_ep")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default")
    result = subprocess.run(
        [sys.executable, "-m", "launch", f"--train.steps={STEPS}", "--checkpoint.every=2",
         f"--checkpoint.dir={out / 'checkpoints'}", f"--train.metrics_file={out / 'metrics.jsonl'}",
         "--moe.dispatcher=deepep"],
        capture_output=True, text=True, timeout=600, cwd=out,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([NO_DEEP_EP, os.getcwd()])})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout + result.stderr


def test_summary_names_layout_and_the_deepep_fallback(default_run):
    _, output = default_run
    for expected in ["model: Qwen3MoeForCausalLM", "pp=2 x dp_replicate=1 x dp_shard=2 x ep=2",
                     "pipeline: Interleaved1F1B", "activation checkpointing: selective",
                     "harness.ep_dispatch", "dispatcher deepep: not installed", "-> alltoall"]:
        assert expected in output, expected
    # Shown once by rank 0, not once per rank.
    assert output.count("deepep: not installed") <= 2  # the warning and the summary line
    assert "OMP_NUM_THREADS" not in output  # torchrun's banner, when it picks the thread count itself


def test_metrics_fields_are_present_and_finite(default_run):
    out, _ = default_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        for key in ["loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu", "param_mib", "grad_mib",
                    "optimizer_mib", "peak_mib", "expert_load_max_over_mean"]:
            assert math.isfinite(row[key]) and row[key] >= 0, key
        # 16 x 128 tokens, top-2, 4 MoE layers: counted once even though AC recomputes the layers.
        assert row["expert_routed"] == 16 * 128 * 2 * 4
        assert len(row["expert_load"]) == 8 and abs(sum(row["expert_load"]) - 1) < 1e-3
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_run_ends_by_saying_where_outputs_went(default_run):
    out, output = default_run
    assert f"metrics: {out / 'metrics.jsonl'}" in output
    assert f"checkpoint: {out / 'checkpoints' / 'step_0000004'}" in output
    assert "plot: " in output
