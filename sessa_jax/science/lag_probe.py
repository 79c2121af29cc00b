"""Retrieval accuracy against lag: passkey examples with the key at a controlled distance.

A passkey example (``sessa_jax/data/tasks/passkey.py``) of length L is

    <bos> filler[:a] <key> d_1..d_k </key> filler[a:] <query> d_1 .. d_k

The lag is the query position minus the key position, in tokens: the input position of
``<query>`` (where d_1 is predicted) minus the position of d_1 in the key. Every answer digit
d_i is predicted exactly ``lag`` tokens after its copy in the key, so one number describes the
example. With F = L - 2k - 3 filler tokens and ``a`` of them before the key,

    lag = F - a + k + 1,   so   k + 1 <= lag <= F + k + 1 = L - k - 2,

and :func:`depth_for_lag` picks the ``depth = a / F`` that gives a requested lag at length L.

:func:`lag_accuracy` scores a predictor (inputs (B, T) -> argmax predictions (B, T)) on N
held-out examples per lag: digit accuracy (over the k scored positions of each example) and
key accuracy (all k digits right). Only the scored positions count (``loss_mask``).
:func:`checkpoint_lag_accuracy` does it for a trained run directory, at its trained length and
optionally at longer ones (every family here has no learned positions, so any length runs).
:func:`write_csv` and :func:`plot` write OUT/lag_accuracy.csv and OUT/accuracy_vs_lag.png;
the influence curves come from :mod:`sessa_jax.science.influence`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Callable, Optional, Sequence

import numpy as np

from sessa_jax.data.tasks.passkey import KEY, QUERY

Predictor = Callable[[np.ndarray], np.ndarray]  # inputs (B, T) int32 -> predictions (B, T)


class LagProbeError(ValueError):
    """A run directory the probe cannot use (missing, no checkpoint, not a passkey run)."""


@dataclasses.dataclass(frozen=True)
class LagRow:
    family: str
    run: str
    length: int      # tokens before padding (the evaluated sequence length)
    lag: int
    n: int           # examples
    digit_acc: float
    key_acc: float


# -- geometry ------------------------------------------------------------------------------------


def lag_range(length: int, digits: int) -> tuple[int, int]:
    """(smallest, largest) lag a passkey example of ``length`` tokens can have."""
    n_fill = length - 2 * digits - 3
    if n_fill < 1:
        raise ValueError(f"length={length} is too short for a {digits}-digit passkey")
    return digits + 1, n_fill + digits + 1


def lag_grid(length: int, digits: int, n_lags: int = 10) -> list[int]:
    """About ``n_lags`` distinct lags, log-spaced from the smallest to the largest possible."""
    lo, hi = lag_range(length, digits)
    grid = np.unique(np.round(np.geomspace(lo, hi, n_lags)).astype(int))
    return [int(x) for x in grid]


def depth_for_lag(lag: int, length: int, digits: int) -> float:
    """The passkey ``depth`` putting the key ``lag`` tokens before the query at ``length``."""
    lo, hi = lag_range(length, digits)
    if not lo <= lag <= hi:
        raise ValueError(f"lag={lag}: expected {lo} <= lag <= {hi} at length {length}")
    n_fill = length - 2 * digits - 3
    before = n_fill - (lag - digits - 1)
    return before / n_fill  # sample() rounds depth * n_fill back to exactly `before`


def measured_lag(inputs: np.ndarray) -> int:
    """The lag of one example read from its tokens: position of <query> minus that of d_1."""
    inputs = np.asarray(inputs)
    key_pos = int(np.flatnonzero(inputs == KEY)[0])
    query_pos = int(np.flatnonzero(inputs == QUERY)[0])
    return query_pos - (key_pos + 1)


# -- scoring -------------------------------------------------------------------------------------


def score(pred: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> tuple[int, int, int, int]:
    """pred, targets, mask (B, T) -> (digits right, digits scored, keys right, examples).

    Only positions with mask 1 count; a key is right when every one of its scored positions is.
    """
    m = np.asarray(mask) > 0
    right = (np.asarray(pred) == np.asarray(targets)) & m
    keys = np.all(right | ~m, axis=1) & m.any(axis=1)
    return int(right.sum()), int(m.sum()), int(keys.sum()), int(m.shape[0])


def probe_batch(task, split: str, indices: Sequence[int], lag: int, length: int) -> dict:
    """Examples ``indices`` of ``split`` with the key ``lag`` tokens before the query -> batch
    of (B, T) arrays, T = the task's seq_len (>= length)."""
    depth = depth_for_lag(lag, length, task.pc.digits)
    exs = [task.example_at(split, int(i), depth=depth, length=length) for i in indices]
    return {k: np.stack([e[k] for e in exs]) for k in exs[0]}


def lag_accuracy(predict: Predictor, task, lags: Sequence[int], n: int, *, length: int,
                 split: str = "test", batch_size: int = 50, family: str = "",
                 run: str = "") -> list[LagRow]:
    """Digit and key accuracy of ``predict`` at each lag, over examples 0..n-1 of ``split``.

    Every batch has the same shape (the last one is padded by repeating examples and the
    repeats are not scored), so a jitted predictor compiles once per length.
    """
    rows = []
    for lag in lags:
        dr = dn = kr = ke = 0
        for s in range(0, n, batch_size):
            idx = list(range(s, min(s + batch_size, n)))
            real = len(idx)
            idx += [idx[-1]] * (batch_size - real)
            b = probe_batch(task, split, idx, lag, length)
            pred = np.asarray(predict(b["inputs"]))
            a, c, d, e = score(pred[:real], b["targets"][:real], b["loss_mask"][:real])
            dr, dn, kr, ke = dr + a, dn + c, kr + d, ke + e
        rows.append(LagRow(family, run, int(length), int(lag), ke, dr / dn, kr / ke))
    return rows


# -- models --------------------------------------------------------------------------------------


def model_predictor(model) -> Predictor:
    """A jitted argmax predictor for a DecoderLM (compiles once per input shape)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x):
        return jnp.argmax(nnx.merge(graphdef, state)(x), axis=-1).astype(jnp.int32)

    return lambda inputs: np.asarray(f(state, jnp.asarray(inputs, jnp.int32)))


def load_passkey_run(run_dir: str):
    """load_model for a passkey run -> (model, TrainConfig, step); LagProbeError otherwise."""
    from sessa_jax.train import load_model

    if not os.path.isdir(run_dir):
        raise LagProbeError(f"{run_dir}: no such run directory")
    try:
        model, cfg, step = load_model(run_dir)
    except Exception as e:  # noqa: BLE001 - any failure to read a checkpoint is the same to a user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LagProbeError(f"{run_dir}: not a readable run directory ({first})") from None
    if cfg.data.task != "passkey":
        raise LagProbeError(f"{run_dir}: a {cfg.data.task} run, not a passkey run")
    return model, cfg, step


def passkey_task(cfg, length: int):
    """The run's passkey task with arrays of ``max(length, trained seq_len)`` tokens."""
    from sessa_jax.data.pipeline import make_task
    from sessa_jax.train.config import replace

    data = replace(cfg.data, seq_len=max(int(length), cfg.data.seq_len))
    return make_task(data)


def checkpoint_lag_accuracy(run_dir: str, n: int = 200, lengths: Optional[Sequence[int]] = None,
                            n_lags: int = 10, split: str = "test",
                            batch_size: int = 50) -> list[LagRow]:
    """Load a passkey run and measure accuracy vs lag at each of ``lengths`` (default: the
    trained seq_len) over :func:`lag_grid` lags -> rows."""
    model, cfg, step = load_passkey_run(run_dir)
    name = f"{os.path.basename(os.path.normpath(run_dir))}@{step}"
    predict = model_predictor(model)
    rows = []
    for L in lengths or [cfg.data.seq_len]:
        task = passkey_task(cfg, L)
        lags = lag_grid(L, task.pc.digits, n_lags)
        rows += lag_accuracy(predict, task, lags, n, length=L, split=split,
                             batch_size=batch_size, family=cfg.model.family, run=name)
    return rows


# -- output --------------------------------------------------------------------------------------

COLUMNS = ("family", "run", "length", "lag", "n", "digit_acc", "key_acc")


def write_csv(path: str, rows: Sequence[LagRow]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.family, r.run, r.length, r.lag, r.n, f"{r.digit_acc:.4f}",
                        f"{r.key_acc:.4f}"])


def read_csv(path: str) -> list[LagRow]:
    """The rows of a lag_accuracy.csv (accuracies as written, 4 decimals)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [LagRow(r["family"], r["run"], int(r["length"]), int(r["lag"]), int(r["n"]),
                       float(r["digit_acc"]), float(r["key_acc"])) for r in csv.DictReader(fh)]


def write_markdown(path: str, rows: Sequence[LagRow]) -> None:
    """One table per length: a row per run, a column per lag, "digit / key" accuracy in %."""
    lines = []
    for L in sorted({r.length for r in rows}):
        sel = [r for r in rows if r.length == L]
        lags = sorted({r.lag for r in sel})
        runs = list(dict.fromkeys((r.family, r.run) for r in sel))
        lines += [f"Length {L} (digit / whole-key accuracy, %, n = "
                  f"{max(r.n for r in sel)} per lag):", "",
                  "| family | run | " + " | ".join(f"lag {l}" for l in lags) + " |",
                  "|" + "---|" * (2 + len(lags))]
        for fam, run in runs:
            cell = {r.lag: r for r in sel if (r.family, r.run) == (fam, run)}
            lines.append(f"| {fam} | {run} | " + " | ".join(
                f"{100 * cell[l].digit_acc:.0f} / {100 * cell[l].key_acc:.0f}" if l in cell
                else "-" for l in lags) + " |")
        lines.append("")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


def plot(path: str, rows: Sequence[LagRow], trained_length: Optional[int] = None) -> None:
    """Digit and key accuracy vs lag, one colour per run; dashed = beyond the trained length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    runs = list(dict.fromkeys((r.family, r.run) for r in rows))
    lengths = sorted({r.length for r in rows})
    base = trained_length or lengths[0]
    for i, (fam, run) in enumerate(runs):
        colour = f"C{i}"
        for L in lengths:
            sel = sorted((r for r in rows if (r.family, r.run) == (fam, run) and r.length == L),
                         key=lambda r: r.lag)
            if not sel:
                continue
            style = "o-" if L <= base else "s--"
            label = fam if L <= base else f"{fam} @ length {L}"
            for ax, attr in zip(axes, ("digit_acc", "key_acc")):
                ax.plot([r.lag for r in sel], [getattr(r, attr) for r in sel], style,
                        color=colour, label=label, ms=4)
    axes[0].axhline(0.1, color="gray", ls=":", lw=1, label="chance (digit)")
    for ax, title in zip(axes, ("digit accuracy", "whole-key accuracy")):
        ax.set_xscale("log")
        ax.set(xlabel="lag (query position - key position, tokens)", ylabel=title,
               title=f"passkey {title} vs lag", ylim=(-0.02, 1.02))
        if trained_length:
            ax.axvline(trained_length, color="gray", ls="-.", lw=1,
                       label="trained length" if ax is axes[0] else None)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
