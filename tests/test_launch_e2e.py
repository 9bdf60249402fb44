"""`python -m launch` end to end: validate, spawn gloo workers through torchrun, train, write metrics."""

import json
import os
import subprocess
import sys

RECIPE = """
model:
  preset: llama
train:
  steps: 12
  global_batch_size: 8
  micro_batch_size: 2
  seq_len: 64
  lr: 1.0e-2
  warmup_steps: 2
data:
  max_bytes: 300000
parallel:
  dp_shard: 2
"""


def test_launch_trains_and_writes_metrics(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    metrics = tmp_path / "metrics.jsonl"
    result = subprocess.run([sys.executable, "-m", "launch", "--config", str(recipe),
                             f"--train.metrics_file={metrics}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for row in rows:
        assert {"step", "loss", "tokens_per_s", "grad_norm", "lr", "step_time_s"} <= row.keys()
        assert row["tokens_per_s"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
