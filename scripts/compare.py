#!/usr/bin/env python
"""Matched comparison of model families on one task at an equal training-token budget.

    python scripts/compare.py --task configs/tasks/mqar-sessa.yaml \\
        --families sessa,transformer,mamba --budget-tokens 2000000 --eval-lengths 512,1024 \\
        --out runs/compare-mqar [key=value ...]

The task config's model is replaced per family by configs/models/<family>-<S>.yaml
(--sizing S: tiny (default), 10m, 125m, 350m) or by match_widths to the task model's parameter count
(--sizing match); key=value overrides apply to every family afterwards. Each family trains
in OUT/<family>/ (re-running resumes/only evaluates finished runs). Writes OUT/results.md,
results.csv, learning_curves.png and accuracy_vs_length.png.
"""

from __future__ import annotations

import argparse
import sys

from sessa_jax.science.compare import compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="a configs/tasks/*.yaml")
    p.add_argument("--families", default="sessa,transformer,mamba")
    p.add_argument("--budget-tokens", type=float, default=None,
                   help="training tokens per family (default: the task config's steps)")
    p.add_argument("--eval-lengths", default="", help="comma-separated longer eval lengths")
    p.add_argument("--sizing", default="tiny",
                   help="'match' (widths matched to the task model's size) or a suffix S of "
                        "configs/models/<family>-S.yaml: tiny, 10m, 125m, 350m")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (all families)")
    a = p.parse_args(argv)
    fams = [f.strip() for f in a.families.split(",") if f.strip()]
    lengths = [int(x) for x in a.eval_lengths.split(",") if x.strip()]
    rows = compare(a.task, fams, a.out, budget_tokens=int(a.budget_tokens) if a.budget_tokens
                   else None, eval_lengths=lengths, sizing=a.sizing, overrides=a.overrides)
    with open(f"{a.out}/results.md", encoding="utf-8") as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
