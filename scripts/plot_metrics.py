#!/usr/bin/env python
"""Plot training loss and eval accuracy of one or more runs from their metrics.jsonl.

    python scripts/plot_metrics.py runs/a runs/b --out curves.png [--smooth 0.9]

Left: training loss per logged step (solid) and eval loss (dots). Right: eval accuracy on
scored positions (solid) and sequence accuracy (dashed); for text runs, eval bits per byte is
drawn instead when no accuracy is logged. One color per run, labelled by its directory name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (is {run_dir!r} a sessa-train run directory?)")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average (alpha 0: raw values)."""
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def plot(run_dirs: list[str], out: str, alpha: float = 0.0) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(run_dirs):
        recs = read_metrics(run)
        color = f"C{i % 10}"
        label = os.path.basename(os.path.normpath(run))
        s, v = series(recs, "loss")
        ax_loss.plot(s, smooth(v, alpha), color=color, label=f"{label} train")
        s, v = series(recs, "eval/loss")
        if s:
            ax_loss.plot(s, v, "o", color=color, ms=4, label=f"{label} eval")
        s, v = series(recs, "eval/accuracy")
        if s:
            ax_acc.plot(s, v, "-o", color=color, ms=3, label=f"{label} accuracy")
            s2, v2 = series(recs, "eval/seq_accuracy")
            ax_acc.plot(s2, v2, "--", color=color, label=f"{label} sequence acc.")
        else:
            s, v = series(recs, "eval/bits_per_byte")
            ax_acc.plot(s, v, "-o", color=color, ms=3, label=f"{label} bits/byte")
    ax_loss.set(xlabel="step", ylabel="loss (nats / scored token)", title="loss")
    ax_acc.set(xlabel="step", ylabel="held-out", title="eval accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories written by sessa-train")
    p.add_argument("--out", required=True, help="output image, e.g. curves.png")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="EMA factor in [0, 1) for the training loss (default 0: raw)")
    args = p.parse_args(argv)
    if not 0.0 <= args.smooth < 1.0:
        p.error("--smooth must be in [0, 1)")
    try:
        plot(args.runs, args.out, args.smooth)
    except (FileNotFoundError, KeyError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
