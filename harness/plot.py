"""Plot a run's metrics: `python -m harness.plot METRICS.jsonl [--out PNG]`.

Panels: loss vs step (and the validation loss where rows have it), tokens/s vs step, and, when
the rows carry them, the per-expert token shares of the last step (bars) and the expert load max/mean over steps. Needs matplotlib (the
`plot` extra); without it, prints how to install it and exits 2. Imports nothing heavy, so it
runs where torch is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_USAGE = 2
INSTALL_HINT = "matplotlib is not installed: pip install matplotlib"


class MetricsError(ValueError):
    """The metrics file cannot be plotted; the message is the one line shown to the user."""


def read_rows(path: str) -> list[dict[str, Any]]:
    """The JSONL rows of a metrics file, checked for the fields every panel needs."""
    if not os.path.isfile(path):
        raise MetricsError(f"{path}: no such metrics file; pass the train.metrics_file of a run")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError:
        raise MetricsError(f"{path}: not a text file; pass a metrics JSONL file") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricsError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or not all(k in row for k in ("step", "loss", "tokens_per_s")):
            raise MetricsError(f"{path}:{number}: a metrics row needs step, loss and tokens_per_s")
        rows.append(row)
    if not rows:
        raise MetricsError(f"{path}: no metrics rows; the run logged no step yet")
    return rows


def plot(rows: list[dict[str, Any]], out: str) -> None:
    """Writes the panels for `rows` to the PNG `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    from matplotlib import pyplot as plt

    steps = [r["step"] for r in rows]
    with_shares = [r for r in rows if r.get("expert_load")]
    with_ratio = [r for r in rows if r.get("expert_load_max_over_mean") is not None]
    panels = 2 + bool(with_shares) + bool(with_ratio)
    fig, axes = plt.subplots(panels, 1, figsize=(7, 2.6 * panels))
    loss_ax, speed_ax, *expert_axes = axes
    loss_ax.plot(steps, [r["loss"] for r in rows], label="train")
    evaluated = [r for r in rows if r.get("val_loss") is not None]
    if evaluated:
        loss_ax.plot([r["step"] for r in evaluated], [r["val_loss"] for r in evaluated], "o-", label="validation")
        loss_ax.legend()
    loss_ax.set(xlabel="step", ylabel="loss", title="loss")
    speed_ax.plot(steps, [r["tokens_per_s"] for r in rows])
    speed_ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    if with_shares:
        last = with_shares[-1]
        ax = expert_axes.pop(0)
        shares = last["expert_load"]
        ax.bar(range(len(shares)), shares)
        # An even split is where every bar would stand: the eye reads imbalance against it.
        ax.axhline(sum(shares) / len(shares), color="grey", linestyle="--", linewidth=1)
        ax.set(xlabel="expert", ylabel="token share", title=f"expert load, step {last['step']}")
    if with_ratio:
        ax = expert_axes.pop(0)
        ax.plot([r["step"] for r in with_ratio], [r["expert_load_max_over_mean"] for r in with_ratio])
        ax.set(xlabel="step", ylabel="max / mean", title="expert load imbalance")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="a run's metrics JSONL file")
    parser.add_argument("--out", help="PNG to write; default: the metrics path with .png")
    args = parser.parse_args(argv)
    # The file is checked before matplotlib, so a wrong path is reported even where it is missing.
    try:
        rows = read_rows(args.metrics)
    except MetricsError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return EXIT_USAGE
    out = args.out or os.path.splitext(args.metrics)[0] + ".png"
    plot(rows, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
