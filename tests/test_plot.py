"""`python -m harness.plot`: the PNG when matplotlib is installed, one-line errors otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.plot import INSTALL_HINT, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path, experts: bool) -> str:
    rows = []
    for step in range(1, 6):
        row = {"step": step, "loss": 5.0 / step, "grad_norm": 1.0, "lr": 1e-3, "tokens": 1024,
               "tokens_per_s": 1000.0 + step, "step_time_s": 1.0}
        if experts:
            row["expert_load"] = [0.1, 0.2, 0.3, 0.4]
            row["expert_load_max_over_mean"] = 1.6
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_without_matplotlib(*args: str) -> subprocess.CompletedProcess:
    """Runs main() in a fresh interpreter where `import matplotlib` fails, whatever is installed."""
    code = ("import sys; sys.modules['matplotlib'] = None; from harness.plot import main; "
            f"sys.exit(main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("experts", [False, True], ids=["dense", "moe"])
def test_writes_png_next_to_metrics(tmp_path, experts):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the `plot` extra)")
    metrics = _write_metrics(tmp_path / "metrics.jsonl", experts)
    assert main([metrics]) == 0
    png = tmp_path / "metrics.png"
    data = png.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)


def test_out_flag_names_the_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (the `plot` extra)")
    metrics = _write_metrics(tmp_path / "metrics.jsonl", experts=True)
    out = tmp_path / "plots" / "run.png"
    assert main([metrics, "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_missing_matplotlib_prints_install_hint(tmp_path):
    metrics = _write_metrics(tmp_path / "metrics.jsonl", experts=False)
    result = _run_without_matplotlib(metrics)
    assert result.returncode == 2
    assert result.stderr.strip() == INSTALL_HINT
    assert not (tmp_path / "metrics.png").exists()


@pytest.mark.parametrize("content", [None, "", "not json\n", '{"step": 1}\n', b"\xff\xfe\x00"],
                         ids=["missing", "empty", "not-json", "no-loss", "binary"])
def test_bad_metrics_file_is_one_line_exit_2(tmp_path, content):
    metrics = tmp_path / "metrics.jsonl"
    if isinstance(content, bytes):
        metrics.write_bytes(content)
    elif content is not None:
        metrics.write_text(content)
    # Without matplotlib too: the file is checked first, so the user learns of the real problem.
    result = _run_without_matplotlib(str(metrics))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(str(metrics)), result.stderr
