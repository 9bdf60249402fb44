"""`python -m launch` as real jobs: two nodes on this machine, a worker killed mid-run and
restarted by torchrun, a preemption signal, and bad input refused before anything starts.

Every run here is the same 2-rank FSDP job; the uninterrupted single-node run (a module
fixture) is what the others must reproduce. Checkpoints are compared whole (model, optimizer,
schedule, step) after reading them back in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

STEPS = 10
# The job's own recipe: the shipped default recipe is a demo that others change.
RECIPE = f"""
model: {{preset: llama}}
train: {{steps: {STEPS}, global_batch_size: 8, micro_batch_size: 2, seq_len: 32, lr: 1.0e-2, warmup_steps: 1}}
data: {{max_bytes: 200000}}
parallel: {{dp_shard: 2}}
checkpoint: {{every: 2, keep: 2}}
logging: {{progress: false, log_every: 1}}
"""
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600


def _outputs(folder: Path) -> list[str]:
    return [f"--run.dir={folder}", f"--checkpoint.dir={folder / 'ckpt'}",
            f"--train.metrics_file={folder / 'metrics.jsonl'}"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LOCAL_RANK", None)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"launcher did not finish within {TIMEOUT}s:\n{log.read_text()[-3000:]}")


def _run(args: list[str], log: Path) -> int:
    return _finish(_start(args, log), log)


def _losses(metrics: Path) -> dict[int, float]:
    """Loss per step; after a restart the repeated steps' last rows win."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def _checkpoint(path: Path, tmp: Path) -> dict:
    file = tmp / f"{path.name}.pt"
    dcp_to_torch_save(path, file)
    return torch.load(file, weights_only=False)


def _assert_same_state(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"launcher exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {TIMEOUT}s")
        time.sleep(0.02)


def _children(parent: int) -> list[int]:
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> list[str]:
    recipe = tmp_path_factory.mktemp("recipe") / "job.yaml"
    recipe.write_text(RECIPE)
    return ["--config", str(recipe)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, job) -> Path:
    """The uninterrupted single-node job."""
    folder = tmp_path_factory.mktemp("straight")
    log = folder / "log.txt"
    assert _run(["--nproc-per-node", "2", *job, *_outputs(folder)], log) == 0, log.read_text()[-3000:]
    return folder


def _final(folder: Path) -> Path:
    return folder / "ckpt" / f"step_{STEPS:07d}"


def test_two_nodes_match_one_node(straight, job, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    nodes = [_start(["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "two-nodes", *job, *_outputs(tmp_path)],
                    tmp_path / f"node{rank}.txt") for rank in range(2)]
    codes = [_finish(proc, tmp_path / f"node{rank}.txt") for rank, proc in enumerate(nodes)]
    assert codes == [0, 0], (tmp_path / "node0.txt").read_text()[-3000:]
    expected = _losses(straight / "metrics.jsonl")
    got = _losses(tmp_path / "metrics.jsonl")
    assert sorted(got) == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([got[s] for s in sorted(got)]),
                               torch.tensor([expected[s] for s in sorted(expected)]), atol=1e-6, rtol=0)


def test_killed_worker_is_restarted_and_resumes(straight, job, tmp_path):
    log = tmp_path / "log.txt"
    ckpt = tmp_path / "ckpt"
    proc = _start(["--nproc-per-node", "2", "--max-restarts", "1", *job, *_outputs(tmp_path)], log)
    _wait_for(lambda: (ckpt / "step_0000002").is_dir(), proc, log, "first checkpoint")
    workers = _children(proc.pid)
    assert len(workers) == 2, f"expected 2 workers under the launcher, found {workers}"
    os.kill(workers[1], signal.SIGKILL)
    # What a crash in the middle of a save leaves behind (data, no .metadata yet), newer than
    # any complete checkpoint: the restarted workers must not resume from it.
    half = ckpt / f"step_{STEPS - 1:07d}.tmp"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"\0" * 100)
    assert _finish(proc, log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "resumed from" in text, "the restarted workers did not resume from a checkpoint"
    losses = _losses(tmp_path / "metrics.jsonl")
    assert losses[STEPS] == _losses(straight / "metrics.jsonl")[STEPS]
    _assert_same_state(_checkpoint(_final(tmp_path), tmp_path), _checkpoint(_final(straight), tmp_path))
    assert not half.exists(), "the half-written checkpoint was not cleaned up"


def test_preemption_signal_checkpoints_and_resume_is_bitwise(straight, job, tmp_path):
    log = tmp_path / "log.txt"
    ckpt = tmp_path / "ckpt"
    proc = _start(["--nproc-per-node", "2", *job, *_outputs(tmp_path)], log)
    _wait_for(lambda: (ckpt / "step_0000002").is_dir(), proc, log, "first checkpoint")
    proc.send_signal(signal.SIGUSR1)
    assert _finish(proc, log) == 0, log.read_text()[-3000:]
    stopped = max(_losses(tmp_path / "metrics.jsonl"))
    assert stopped < STEPS, "the job ran to the end: the signal came too late to test anything"
    assert (ckpt / f"step_{stopped:07d}").is_dir(), "no checkpoint at the step the job stopped after"
    assert _run(["--nproc-per-node", "2", *job, *_outputs(tmp_path)], log) == 0, log.read_text()[-3000:]
    assert _losses(tmp_path / "metrics.jsonl") == _losses(straight / "metrics.jsonl")
    _assert_same_state(_checkpoint(_final(tmp_path), tmp_path), _checkpoint(_final(straight), tmp_path))


def _refused(args: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    done = subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_is_one_line_and_touches_nothing(straight, job, tmp_path):
    as_file = tmp_path / "ckpt_is_a_file"
    as_file.write_text("not a folder")
    line = _refused(["--nproc-per-node", "2", *job, f"--checkpoint.dir={as_file}"])
    assert "checkpoint.dir=" in line and "not a directory" in line
    assert as_file.read_text() == "not a folder"

    corrupt = tmp_path / "corrupt"
    shutil.copytree(straight / "ckpt", corrupt / "ckpt")
    newest = corrupt / "ckpt" / f"step_{STEPS:07d}"
    (newest / ".metadata").write_bytes((newest / ".metadata").read_bytes()[:100])
    (corrupt / "metrics.jsonl").write_text("")
    before = _snapshot(corrupt)
    line = _refused(["--nproc-per-node", "2", *job, *_outputs(corrupt)])
    assert "checkpoint.dir=" in line and "corrupt" in line and "unreadable .metadata" in line
    assert _snapshot(corrupt) == before
    truncated = corrupt / "ckpt" / f"step_{STEPS - 2:07d}" / "__1_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    before = _snapshot(corrupt)
    line = _refused(["--nproc-per-node", "2", *job, *_outputs(corrupt),
                     f"--checkpoint.resume_from={truncated.parent}"])
    assert "checkpoint.resume_from=" in line and "truncated" in line
    assert _snapshot(corrupt) == before

    line = _refused(["--nproc-per-node", "2", *job, "--parallel.dp_shard=4", *_outputs(corrupt)])
    assert "world size is 2" in line
    assert _snapshot(corrupt) == before
