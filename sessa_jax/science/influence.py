"""Memory tail: influence of input position j on output position t as a function of lag.

For a model, influence(t, j) = ||d y_t / d x_j||_F, the Frobenius norm of the D x D Jacobian
block, where x = the embedded inputs (``model.embed(tokens)``) and y = the final hidden states
(after the blocks and the final LayerNorm, as ``DecoderLM.hidden``). The curve is

    value(l) = mean over seeds (random token inputs) and over t >= l of influence(t, t - l).

How the Jacobian is computed (:func:`model_influence`): the model is linearised once with
``jax.vjp`` at the embedded inputs and the VJP is batched with ``vmap`` over cotangents:

* ``method="exact"``: one cotangent per (output position t, output channel d), i.e. T * D
  VJPs giving the whole Jacobian; ||J_tj||_F^2 = sum_d ||e_{t,d}^T J_tj||^2 exactly.
* ``method="probe"``: a random-projection (Hutchinson-type) estimator: for each output
  position t, K Gaussian cotangents u ~ N(0, I_D) placed at position t; then
  E ||u^T J_tj||^2 = ||J_tj||_F^2, so the mean over K probes is unbiased for the squared norm.
  T * K VJPs instead of T * D.
* ``"auto"`` (default): exact when T * D <= 8192, else probe with K = 8.

Fits (:func:`fit_curve`): least squares of log value vs log lag (power law, slope = -beta)
and of log value vs lag (exponential, slope = -1/tau), both over lags [lag_min, lag_max];
R^2 of each says which describes the tail better.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Optional, Sequence

import numpy as np


# -- fits ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Fit:
    name: str
    lag_min: int
    lag_max: int
    power_slope: float      # d log value / d log lag  (-beta)
    power_r2: float
    exp_slope: float        # d log value / d lag      (-1/tau)
    exp_r2: float

    @property
    def better(self) -> str:
        return "power" if self.power_r2 >= self.exp_r2 else "exponential"


def _linfit(x, y) -> tuple[float, float, float]:
    """Least-squares y = a + b x -> (b, a, R^2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    A = np.stack([np.ones_like(x), x], 1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    ss_res = float(np.sum((y - a - b * x) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return float(b), float(a), r2


def default_fit_range(T: int) -> tuple[int, int]:
    """Lags away from both ends: 20..T/4 for long curves, shrinking for short ones."""
    lo = 20 if T >= 160 else max(1, T // 8)
    hi = max(T // 4, lo + 3)
    return lo, min(hi, T - 1)


def fit_curve(name: str, lags, values, lag_min: int, lag_max: int) -> Fit:
    """Power-law and exponential fits of ``values`` over lags in [lag_min, lag_max]."""
    lags, values = np.asarray(lags, np.float64), np.asarray(values, np.float64)
    keep = (lags >= lag_min) & (lags <= lag_max) & (values > 0) & np.isfinite(values)
    if keep.sum() < 2:
        nan = float("nan")
        return Fit(name, lag_min, lag_max, nan, nan, nan, nan)
    l, lv = lags[keep], np.log(values[keep])
    ps, _, pr2 = _linfit(np.log(l), lv)
    es, _, er2 = _linfit(l, lv)
    return Fit(name, int(lag_min), int(lag_max), ps, pr2, es, er2)


# -- models --------------------------------------------------------------------------------------


def _hidden_from_embedded(model):
    """A pure function (state, x (B, T, D)) -> final hidden (B, T, D) for ``model``."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    def f(state, x):
        m = nnx.merge(graphdef, state)
        return m.ln_f(m.blocks_forward(x))  # either parameter layout

    return f, state


def model_influence(model, T: int, seeds: Sequence[int] = (0,), method: str = "auto",
                    probes: int = 8, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(lags 1..T-1, value(l)) for a DecoderLM; see the module docstring for the estimator.

    Returns values as float64, averaged over ``seeds`` (each a random token sequence of length
    T drawn uniformly from the model's vocabulary) and over output positions t >= l.
    """
    import jax
    import jax.numpy as jnp

    D, V = model.cfg.d_model, model.cfg.vocab_size
    if method == "auto":
        method = "exact" if T * D <= 8192 else "probe"
    if method not in ("exact", "probe"):
        raise ValueError(f"method={method!r}: expected exact, probe or auto")
    f, state = _hidden_from_embedded(model)
    acc = np.zeros(T)
    for seed in seeds:
        key = jax.random.PRNGKey(seed)
        k_tok, k_probe = jax.random.split(key)
        tokens = jax.random.randint(k_tok, (1, T), 0, V)
        x = model.embed_tokens(tokens).astype(jnp.float32)
        _, vjp_fn = jax.vjp(lambda x_: f(state, x_).astype(jnp.float32), x)
        if method == "exact":
            ts, ds = np.meshgrid(np.arange(T), np.arange(D), indexing="ij")
            ts, ds = ts.reshape(-1), ds.reshape(-1)
            n = len(ts)
            weights = np.ones(n)
        else:
            ts = np.repeat(np.arange(T), probes)
            ds = None
            n = len(ts)
            weights = np.full(n, 1.0 / probes)
            u_all = jax.random.normal(k_probe, (n, D), jnp.float32)

        batched = jax.jit(jax.vmap(lambda ct: vjp_fn(ct)[0]))
        sq = np.zeros((T, T))  # sq[t, j] = ||J_tj||_F^2 (estimate)
        for s in range(0, n, chunk):
            tt = ts[s:s + chunk]
            m = len(tt)
            ct = jnp.zeros((m, 1, T, D), jnp.float32)
            if method == "exact":
                ct = ct.at[jnp.arange(m), 0, tt, ds[s:s + chunk]].set(1.0)
            else:
                ct = ct.at[jnp.arange(m), 0, tt, :].set(u_all[s:s + chunk])
            g = np.asarray(batched(ct), np.float64)[:, 0]          # (m, T_j, D)
            rows = np.sum(g * g, axis=-1) * weights[s:s + chunk, None]  # (m, T_j)
            np.add.at(sq, tt, rows)
        norms = np.sqrt(sq)
        for l in range(T):
            acc[l] += float(np.mean(np.diagonal(norms, offset=-l)))
    vals = acc / len(seeds)
    return np.arange(1, T), vals[1:]


def checkpoint_influence(run_dir: str, T: Optional[int] = None, seeds=(0,), **kw):
    """Load ``run_dir`` with load_model and measure it -> (name, family, lags, values)."""
    from sessa_jax.train import load_model

    model, cfg, step = load_model(run_dir)
    T = T or cfg.data.seq_len
    lags, vals = model_influence(model, T, seeds, **kw)
    name = f"{os.path.basename(os.path.normpath(run_dir))}@{step}"
    return name, cfg.model.family, lags, vals


# -- output --------------------------------------------------------------------------------------


def write_csv(path: str, curves: Sequence[tuple[str, str, np.ndarray, np.ndarray]]) -> None:
    """curves: (family, name, lags, values) -> CSV with columns family, name, lag, value."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["family", "name", "lag", "value"])
        for fam, name, lags, vals in curves:
            for l, v in zip(lags, vals):
                w.writerow([fam, name, int(l), repr(float(v))])


def write_fits(path: str, fits: Sequence[Fit]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "lag_min", "lag_max", "power_slope", "power_r2", "exp_slope",
                    "exp_r2", "better"])
        for f in fits:
            w.writerow([f.name, f.lag_min, f.lag_max, f.power_slope, f.power_r2, f.exp_slope,
                        f.exp_r2, f.better])


def plot(path: str, curves, fits: Sequence[Fit]) -> None:
    """All curves on one log-log figure, each with its fitted power law over its fit range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for (fam, name, lags, vals), fit in zip(curves, fits):
        lags, vals = np.asarray(lags, float), np.asarray(vals, float)
        ok = vals > 0
        line, = ax.loglog(lags[ok], vals[ok], lw=1.5,
                          label=f"{name}: slope {fit.power_slope:.3f} (R² {fit.power_r2:.3f}); "
                                f"exp R² {fit.exp_r2:.3f} -> {fit.better}")
        if math.isfinite(fit.power_slope):
            sel = (lags >= fit.lag_min) & (lags <= fit.lag_max) & ok
            if sel.any():
                l = lags[sel]
                lv = np.log(vals[sel])
                a = float(np.mean(lv - fit.power_slope * np.log(l)))
                ax.loglog(l, np.exp(a) * l ** fit.power_slope, "--", color=line.get_color(),
                          lw=1)
    top = max((float(np.max(c[3])) for c in curves if len(c[3])), default=1.0)
    ax.set_ylim(bottom=top * 1e-12)  # keep fast (exponential) tails from flattening the rest
    ax.set_xlabel("lag l = t - j")
    ax.set_ylabel("mean ||dy_t/dx_j||_F")
    ax.set_title("Memory tail (dashed: power-law fits over the fit range)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out_dir: str, curves, lag_range: Optional[tuple[int, int]] = None,
           T: Optional[int] = None) -> list[Fit]:
    """Fit every curve, write influence.csv, fits.csv and influence.png into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    fits = []
    for fam, name, lags, vals in curves:
        lo, hi = lag_range or default_fit_range(T or (int(np.max(lags)) + 1))
        fits.append(fit_curve(name, lags, vals, lo, hi))
    write_csv(os.path.join(out_dir, "influence.csv"), curves)
    write_fits(os.path.join(out_dir, "fits.csv"), fits)
    plot(os.path.join(out_dir, "influence.png"), curves, fits)
    return fits
