#!/usr/bin/env python
"""Passkey retrieval accuracy against lag, and the memory tail, of trained passkey runs.

    python scripts/lag_probe.py --checkpoint runs/lag-passkey/sessa \\
        --checkpoint runs/lag-passkey/transformer --n 200 --lags 10 --lengths 256,512 \\
        --influence-seeds 2 --out results/lag_probe

For each run: N held-out ("test" split) examples per lag, the key placed lag tokens before the
query (lag grid log-spaced over what each length allows; see sessa_jax/science/lag_probe.py),
digit and whole-key accuracy; then the influence curve of the run at its trained length
(sessa_jax/science/influence.py) with power-law and exponential fits. Writes
OUT/lag_accuracy.csv (family, run, length, lag, n, digit_acc, key_acc), OUT/lag_accuracy.md
(the same as tables), OUT/accuracy_vs_lag.png
and OUT/influence.csv, fits.csv, influence.png.
"""

from __future__ import annotations

import argparse
import os
import sys

from sessa_jax.science.influence import checkpoint_influence, report
from sessa_jax.science.lag_probe import (LagProbeError, checkpoint_lag_accuracy,
                                         load_passkey_run, plot, write_csv,
                                         write_markdown)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="RUN_DIR")
    p.add_argument("--n", type=int, default=200, help="examples per lag")
    p.add_argument("--lags", type=int, default=10, help="lags per length (log-spaced)")
    p.add_argument("--lengths", default="",
                   help="comma-separated eval lengths (default: each run's trained seq_len)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--influence-seeds", type=int, default=1,
                   help="random token inputs per run for the influence curve (0: skip)")
    p.add_argument("--lag-min", type=int, default=None, help="influence fit range")
    p.add_argument("--lag-max", type=int, default=None)
    p.add_argument("--out", default="runs/lag_probe")
    a = p.parse_args(argv)
    lengths = [int(x) for x in a.lengths.split(",") if x.strip()] or None

    try:  # every run is checked before the long part starts
        trained = [load_passkey_run(r)[1].data.seq_len for r in a.checkpoint]
    except LagProbeError as e:
        print(f"lag_probe: {e}", file=sys.stderr)
        return 2
    os.makedirs(a.out, exist_ok=True)
    rows, curves = [], []
    for run in a.checkpoint:
        rows += checkpoint_lag_accuracy(run, a.n, lengths, a.lags, batch_size=a.batch_size)
        if a.influence_seeds:
            name, fam, lags, v = checkpoint_influence(run, None, seeds=range(a.influence_seeds))
            curves.append((fam, name, lags, v))
    write_csv(os.path.join(a.out, "lag_accuracy.csv"), rows)
    write_markdown(os.path.join(a.out, "lag_accuracy.md"), rows)
    plot(os.path.join(a.out, "accuracy_vs_lag.png"), rows, trained_length=min(trained))
    print(f"{'run':28s} {'length':>6s} {'lag':>5s} {'n':>5s} {'digit':>6s} {'key':>6s}")
    for r in rows:
        print(f"{r.run:28s} {r.length:6d} {r.lag:5d} {r.n:5d} {r.digit_acc:6.3f} "
              f"{r.key_acc:6.3f}")
    if curves:
        rng = None
        if a.lag_min is not None or a.lag_max is not None:
            rng = (a.lag_min or 1, a.lag_max or 10 ** 9)
        fits = report(a.out, curves, rng)
        for f in fits:
            print(f"{f.name:28s} lags {f.lag_min}..{f.lag_max}: power slope "
                  f"{f.power_slope:.4f} (R2 {f.power_r2:.4f}), exp slope {f.exp_slope:.4g} "
                  f"(R2 {f.exp_r2:.4f}) -> {f.better}")
    print(f"wrote {a.out}/lag_accuracy.csv, lag_accuracy.md, accuracy_vs_lag.png"
          + (", influence.csv, fits.csv, influence.png" if curves else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
