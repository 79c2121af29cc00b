#!/usr/bin/env python
"""Memory tail: influence of input j on output t vs lag l = t - j, with power-law and
exponential fits (see sessa_jax/science/influence.py for the Jacobian estimator).

    # closed-form constructions (T 2000, fits over lags 20..500)
    python scripts/influence.py --construct sessa-uniform --construct attention-uniform \\
        --construct ssm-decay --gamma 0.3 --gamma 0.6 --gamma 0.9 --out runs/influence

    # the non-decaying two-layer Sessa construction (flat over lags 10..1000)
    python scripts/influence.py --construct sessa-flat --construct sessa-uniform \\
        --lag-min 10 --lag-max 1000 --out runs/influence-flat

    # trained models: x = embedded inputs, y = final hidden states; random tokens per seed
    python scripts/influence.py --checkpoint runs/mqar-sessa --checkpoint runs/mqar-mamba \\
        --T 256 --seeds 3 --out runs/influence-mqar

Writes OUT/influence.csv (family, name, lag, value), OUT/fits.csv (power-law slope and R^2,
exponential slope and R^2, which fits better) and OUT/influence.png (log-log, all curves).
"""

from __future__ import annotations

import argparse
import sys

from sessa_jax.science.constructions import CONSTRUCTIONS, FLAT_GAMMA, construction_curve
from sessa_jax.science.influence import checkpoint_influence, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], metavar="RUN_DIR")
    p.add_argument("--construct", action="append", default=[], choices=CONSTRUCTIONS)
    p.add_argument("--T", type=int, default=None,
                   help="sequence length (constructions: 2000; checkpoints: data.seq_len)")
    p.add_argument("--seeds", type=int, default=1, help="random token inputs per checkpoint")
    p.add_argument("--gamma", type=float, action="append", default=None,
                   help="sessa-uniform gain (repeatable; default 0.5)")
    p.add_argument("--decay", type=float, default=0.95, help="ssm-decay a")
    p.add_argument("--flat-gamma", type=float, default=FLAT_GAMMA,
                   help=f"sessa-flat's tied gain per layer (default {FLAT_GAMMA})")
    p.add_argument("--layers", type=int, default=2, help="sessa-flat's number of layers")
    p.add_argument("--method", default="auto", choices=("auto", "exact", "probe"))
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--lag-min", type=int, default=None)
    p.add_argument("--lag-max", type=int, default=None)
    p.add_argument("--out", default="runs/influence")
    a = p.parse_args(argv)
    if not a.checkpoint and not a.construct:
        p.error("give at least one --checkpoint or --construct")

    curves = []
    for name in a.construct:
        T = a.T or 2000
        if name == "sessa-uniform":
            for g in a.gamma or [0.5]:
                lags, v = construction_curve(name, T, gamma=g)
                curves.append(("construction", f"{name}(gamma={g:g})", lags, v))
        elif name == "sessa-flat":
            lags, v = construction_curve(name, T, flat_gamma=a.flat_gamma, layers=a.layers)
            curves.append(("construction", f"{name}(gamma={a.flat_gamma:g},L={a.layers})",
                           lags, v))
        else:
            lags, v = construction_curve(name, T, decay=a.decay)
            label = f"{name}(a={a.decay:g})" if name == "ssm-decay" else name
            curves.append(("construction", label, lags, v))
    for run in a.checkpoint:
        name, fam, lags, v = checkpoint_influence(run, a.T, seeds=range(a.seeds),
                                                  method=a.method, probes=a.probes)
        curves.append((fam, name, lags, v))

    rng = None
    if a.lag_min is not None or a.lag_max is not None:
        rng = (a.lag_min or 1, a.lag_max or 10 ** 9)
    fits = report(a.out, curves, rng)
    print(f"{'curve':36s} {'lags':>10s} {'power slope':>12s} {'R2':>7s} {'exp slope':>10s} "
          f"{'R2':>7s}  better")
    for f in fits:
        print(f"{f.name:36s} {f'{f.lag_min}..{f.lag_max}':>10s} {f.power_slope:12.4f} "
              f"{f.power_r2:7.4f} {f.exp_slope:10.4g} {f.exp_r2:7.4f}  {f.better}")
    print(f"wrote {a.out}/influence.csv, fits.csv, influence.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
