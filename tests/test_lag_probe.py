"""Lag probe: probe examples have exactly the requested lag, scoring counts only the scored
positions, and the CSV/plot come out with the right columns and lags."""

import csv
import importlib.util
import os

import numpy as np
import pytest

from sessa_jax.data.config import DataConfig, PasskeyConfig
from sessa_jax.data.tasks.passkey import DIGIT0, PasskeyTask
from sessa_jax.science.lag_probe import (COLUMNS, LagProbeError, depth_for_lag, lag_accuracy,
                                         lag_grid, lag_range, load_passkey_run, measured_lag,
                                         model_predictor, plot, probe_batch, read_csv, score,
                                         write_csv,
                                         write_markdown)

K = 5


def _task(seq_len):
    return PasskeyTask(DataConfig(task="passkey", seq_len=seq_len,
                                  passkey=PasskeyConfig(digits=K)))


@pytest.mark.parametrize("length,seq_len", [(64, 64), (101, 128), (256, 256)])
def test_every_lag_is_exact(length, seq_len):
    """All lags the length allows, read back from the tokens: the <query>/<key> positions and
    the digit copied at each scored position sit exactly `lag` tokens apart."""
    task = _task(seq_len)
    lo, hi = lag_range(length, K)
    assert (lo, hi) == (K + 1, length - K - 2)
    for lag in range(lo, hi + 1):
        b = probe_batch(task, "test", [0, 3], lag, length)
        for inp, tgt, m in zip(b["inputs"], b["targets"], b["loss_mask"]):
            assert measured_lag(inp) == lag
            scored = np.flatnonzero(m)
            assert len(scored) == K and scored[0] == length - K  # <query> at L - k
            np.testing.assert_array_equal(inp[scored - lag], tgt[scored])
            assert np.all((tgt[scored] >= DIGIT0) & (tgt[scored] < DIGIT0 + 10))
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match="lag="):
            depth_for_lag(bad, length, K)


def test_lag_grid_log_spaced_and_in_range():
    g = lag_grid(256, K, 10)
    assert g[0] == K + 1 and g[-1] == 256 - K - 2
    assert g == sorted(set(g)) and 8 <= len(g) <= 10
    ratios = np.diff(np.log(g))
    assert ratios.max() < 2.5 * ratios.min()


def test_score_counts_only_scored_positions():
    task = _task(64)
    b = probe_batch(task, "test", [0, 1], 20, 64)
    t, m = b["targets"], b["loss_mask"]
    on = m > 0
    # Right only where scored, garbage elsewhere: perfect.
    assert score(np.where(on, t, -1), t, m) == (2 * K, 2 * K, 2, 2)
    # Right everywhere except the scored positions: zero.
    assert score(np.where(on, t + 1, t), t, m) == (0, 2 * K, 0, 2)
    # Example 0 all right, example 1 wrong on its last digit: keys 1/2, digits 2k-1 of 2k.
    pred = t.copy()
    pred[1, np.flatnonzero(on[1])[-1]] += 1
    assert score(pred, t, m) == (2 * K - 1, 2 * K, 1, 2)


def _copier(lag):
    """An oracle that predicts input[t - lag] at every position t (right on the answers only)."""
    def predict(inputs):
        out = np.zeros_like(inputs)
        out[:, lag:] = inputs[:, :-lag]
        return out
    return predict


def test_lag_accuracy_csv_and_plot(tmp_path):
    task = _task(64)
    lags = lag_grid(64, K, 6)
    rows = []
    for lag in lags:  # the copier is built for one lag: right there, and it scores 1.0
        rows += lag_accuracy(_copier(lag), task, [lag], 7, length=64, batch_size=4,
                             family="oracle", run="copy")
    assert all(r.n == 7 and r.digit_acc == 1.0 and r.key_acc == 1.0 for r in rows)
    # A predictor that always says "0": digit accuracy = the share of zeros among the answers.
    zero = lambda inputs: np.full_like(inputs, DIGIT0)
    blind = lag_accuracy(zero, task, lags, 7, length=64, batch_size=4, family="blind",
                         run="zero")
    for r in blind:
        b = probe_batch(task, "test", range(7), r.lag, 64)
        want = np.mean(b["targets"][b["loss_mask"] > 0] == DIGIT0)
        assert r.digit_acc == pytest.approx(want) and r.key_acc == 0.0
    write_csv(str(tmp_path / "lag_accuracy.csv"), rows + blind)
    with open(tmp_path / "lag_accuracy.csv") as f:
        got = list(csv.DictReader(f))
    assert tuple(got[0]) == COLUMNS
    assert [int(r["lag"]) for r in got if r["family"] == "oracle"] == lags
    assert {int(r["length"]) for r in got} == {64}
    back = read_csv(str(tmp_path / "lag_accuracy.csv"))
    assert [(r.lag, r.n, r.key_acc) for r in back] == [(r.lag, r.n, r.key_acc)
                                                        for r in rows + blind]
    write_markdown(str(tmp_path / "lag_accuracy.md"), rows + blind)
    md = (tmp_path / "lag_accuracy.md").read_text().splitlines()
    assert md[2] == "| family | run | " + " | ".join(f"lag {l}" for l in lags) + " |"
    assert md[4] == "| oracle | copy | " + " | ".join(["100 / 100"] * len(lags)) + " |"
    plot(str(tmp_path / "accuracy_vs_lag.png"), rows + blind, trained_length=64)
    assert os.path.getsize(tmp_path / "accuracy_vs_lag.png") > 1000


def test_model_predictor_matches_direct_argmax():
    """The jitted path scores what the model's own argmax scores, at two lengths (the second
    longer than the task's seq_len would need a longer task: arrays are seq_len long)."""
    import jax.numpy as jnp
    from flax import nnx
    from sessa_jax.models.config import ModelConfig
    from sessa_jax.models.lm import DecoderLM

    task = _task(64)
    model = DecoderLM(ModelConfig(family="sessa", vocab_size=task.vocab_size, d_model=16,
                                  n_layers=1, n_heads=2), rngs=nnx.Rngs(0))
    predict = model_predictor(model)
    rows = lag_accuracy(predict, task, [10, 40], 6, length=64, batch_size=6)
    for r in rows:
        b = probe_batch(task, "test", range(6), r.lag, 64)
        pred = np.asarray(jnp.argmax(model(jnp.asarray(b["inputs"])), -1))
        dr, dn, kr, ke = score(pred, b["targets"], b["loss_mask"])
        assert r.digit_acc == pytest.approx(dr / dn) and r.key_acc == pytest.approx(kr / ke)


def test_bad_run_dirs_fail_in_one_line(tmp_path, capsys):
    with pytest.raises(LagProbeError, match="no such run directory"):
        load_passkey_run(str(tmp_path / "nope"))
    with pytest.raises(LagProbeError, match="not a readable run directory"):
        load_passkey_run(str(tmp_path))
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "lag_probe.py")
    spec = importlib.util.spec_from_file_location("lag_probe_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lag_probe: ") and "\n" not in err
