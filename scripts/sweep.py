#!/usr/bin/env python
"""Run a sweep plan (configs/sweeps/*.yaml) as concurrent matched runs, or summarise one.

    python scripts/sweep.py run configs/sweeps/symbol_soup_paper_2048.yaml --out runs/soup2048 \\
        --jobs 6 [--start-deadline 420 --kill-deadline 560]
    python scripts/sweep.py report configs/sweeps/symbol_soup_paper_2048.yaml --runs runs/soup2048 \\
        --out results/soup2048

Finished runs (OUT/<name>/results.csv) are skipped, so a second call continues the plan.
"""

from __future__ import annotations

import argparse
import math
import sys

from sessa_jax.science.sweep import PlanError, read_plan, report, run_plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("plan")
    r.add_argument("--out", required=True)
    r.add_argument("--jobs", type=int, default=4, help="runs at once")
    r.add_argument("--start-deadline", type=float, default=math.inf,
                   help="seconds after which no run is started")
    r.add_argument("--kill-deadline", type=float, default=math.inf,
                   help="seconds after which running runs are stopped")
    s = sub.add_parser("report")
    s.add_argument("plan")
    s.add_argument("--runs", required=True, help="the run command's --out")
    s.add_argument("--out", required=True, help="where tables and plots go")
    a = p.parse_args(argv)
    try:
        plan = read_plan(a.plan)
        if a.cmd == "run":
            st = run_plan(plan, a.out, jobs=a.jobs, start_deadline_s=a.start_deadline,
                          kill_deadline_s=a.kill_deadline)
            for k, v in st.items():
                print(f"{k}: {v}")
            return 0 if all(v.startswith("done") for v in st.values()) else 1
        print(report(plan, a.runs, a.out))
        return 0
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
