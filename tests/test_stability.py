"""Issue 18's stability tools: the opt-in q_b/k_b norm (off = the reference layer, on = bounded
feedback scores, finite gradients, decode = full sequence) and the per-layer statistics
(computed from the layer's own internals; written to metrics.jsonl on logging steps)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from sessa_jax.models.config import ModelConfig, SessaConfig
from sessa_jax.models.sessa import SessaLayer
from sessa_jax.train.stability import STAT_NAMES, layer_stats

D, T = 8, 12
BASE = dict(d_model=D, n_heads=2, feedback_impl="dense")


def params_of(module):
    return nnx.to_flat_state(nnx.state(module, nnx.Param))


def jit_call(layer, x):
    """layer(x), jitted: one compile instead of the eager forward's many per-op compiles."""
    return nnx.jit(lambda m, x: m(x))(layer, x)


def test_qk_norm_off_is_the_reference_layer_and_on_only_adds_two_scales():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, T, D))
    off = SessaLayer(SessaConfig(**BASE), rngs=nnx.Rngs(0))
    on = SessaLayer(SessaConfig(**BASE, feedback_qk_norm=True), rngs=nnx.Rngs(0))
    p_off, p_on = dict(params_of(off)), dict(params_of(on))
    extra = set(p_on) - set(p_off)
    assert extra == {("mixer", "fb_q_norm", "scale"), ("mixer", "fb_k_norm", "scale")}
    for k, v in p_off.items():  # every shared parameter starts the same: a clean ablation
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(p_on[k][...]))
    from sessa_jax.interop import layer_to_reference
    assert len(layer_to_reference(off)) == len(p_off)  # off maps onto the author's names
    with pytest.raises(ValueError, match="feedback_qk_norm=True"):
        layer_to_reference(on)
    y_off, y_on = np.asarray(jit_call(off, x)), np.asarray(jit_call(on, x))
    assert np.all(np.isfinite(y_on)) and np.max(np.abs(y_on - y_off)) > 1e-4
    from sessa_jax.models.sizing import mixer_params
    from sessa_jax.train.metrics import param_count
    m = dict(family="sessa", vocab_size=20, d_model=D, n_layers=1, n_heads=2)
    assert mixer_params(ModelConfig(**m, feedback_qk_norm=True)) == (
        mixer_params(ModelConfig(**m)) + 2 * D)
    assert param_count(ModelConfig(**m, feedback_qk_norm=True)) == (
        param_count(ModelConfig(**m)) + 2 * D)
    with pytest.raises(ValueError, match="feedback_qk_norm='yes'"):
        SessaConfig(**BASE, feedback_qk_norm="yes")


def test_gamma_bias_init_moves_only_the_gain_bias():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, T, D))
    ref = SessaLayer(SessaConfig(**BASE), rngs=nnx.Rngs(0))
    abl = SessaLayer(SessaConfig(**BASE, gamma_bias_init=-0.5), rngs=nnx.Rngs(0))
    p_ref, p_abl = dict(params_of(ref)), dict(params_of(abl))
    assert set(p_ref) == set(p_abl)
    key = ("mixer", "gamma_bias")
    assert float(p_ref[key][...]) == 1.0 and float(p_abl[key][...]) == -0.5  # spec: 1.0
    for k, v in p_ref.items():
        if k != key:
            np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(p_abl[k][...]))
    assert np.max(np.abs(np.asarray(jit_call(ref, x)) - np.asarray(jit_call(abl, x)))) > 1e-4
    m = ModelConfig(family="sessa", vocab_size=20, d_model=D, n_layers=1, n_heads=2,
                    gamma_bias_init=0.25)
    assert m.block_config().gamma_bias_init == 0.25
    for bad in ("1", float("nan"), True):
        with pytest.raises(ValueError, match="gamma_bias_init"):
            SessaConfig(**BASE, gamma_bias_init=bad)


def _blow_up_feedback(layer, factor=100.0):
    layer.mixer.proj_fb.kernel[...] = layer.mixer.proj_fb.kernel[...] * factor


def test_qk_norm_bounds_the_scores_and_gives_finite_grads():
    x = jax.random.normal(jax.random.PRNGKey(2), (2, T, D))
    stats = {}
    for on in (False, True):
        layer = SessaLayer(SessaConfig(**BASE, feedback_qk_norm=on), rngs=nnx.Rngs(0))
        _blow_up_feedback(layer)
        _, st = layer_stats(layer, x)
        stats[on] = {k: float(v) for k, v in st.items()}
        if on:
            g = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.square(m(x)))))(layer)
            leaves = jax.tree.leaves(g)
            assert leaves and all(np.all(np.isfinite(np.asarray(v))) for v in leaves)
            assert float(jnp.abs(g.mixer.fb_q_norm.scale[...]).sum()) > 0  # it is trained
    # RMS-normed q_b, k_b have norm sqrt(D) (scale 1): |q.k|/sqrt(D) <= sqrt(D)
    assert stats[True]["score_max"] <= np.sqrt(D) + 1e-4
    assert stats[False]["score_max"] > 10 * np.sqrt(D)


def test_qk_norm_decode_equals_full_sequence():
    """Prefill of 3 then 3 decode steps equal the full forward (all jitted: one decode
    compile for the three steps)."""
    layer = SessaLayer(SessaConfig(**BASE, feedback_qk_norm=True), rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 6, D))
    full = np.asarray(jit_call(layer, x))
    cache = layer.init_cache(1, 6)
    y0, cache = jax.jit(lambda x, c: layer.prefill(x, c))(x[:, :3], cache)
    decode = jax.jit(lambda x, c: layer.decode_step(x, c, check=False))
    outs = [np.asarray(y0)]
    for t in range(3, 6):
        y, cache = decode(x[:, t:t + 1], cache)
        outs.append(np.asarray(y))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)


def test_layer_stats_are_of_the_layer_computation():
    layer = SessaLayer(SessaConfig(**BASE), rngs=nnx.Rngs(5))
    x = jax.random.normal(jax.random.PRNGKey(6), (2, T, D))
    y, st = layer_stats(layer, x)
    assert set(st) == set(STAT_NAMES)
    np.testing.assert_allclose(np.asarray(y), np.asarray(layer(x)), atol=1e-6)
    a, _ = layer._pre(x)
    q_b, k_b, gamma = (np.asarray(v, np.float64) for v in layer.mixer._feedback_inputs(a))
    assert np.isclose(float(st["gamma_abs_max"]), np.abs(gamma).max(), rtol=1e-6)
    assert np.isclose(float(st["gamma_mean"]), gamma.mean(), rtol=1e-5)
    sc = q_b[0] @ k_b[0].T / np.sqrt(D)
    strict = sc[np.tril_indices(T, k=-1)]
    assert np.isclose(float(st["score_max"]), strict.max(), rtol=1e-5)
    assert np.isclose(float(st["score_std"]), strict.std(), rtol=1e-4)
    f = np.asarray(layer.mixer.attend(a), np.float64)
    from sessa_jax.ops.feedback import feedback_solve
    s = np.asarray(feedback_solve(*layer.mixer._feedback_inputs(a), layer.mixer.attend(a),
                                  impl="dense"), np.float64)
    rms = lambda v: np.sqrt(np.mean(v ** 2))
    q = T // 4
    assert np.isclose(float(st["s_growth"]), rms(s[:, -q:]) / rms(s[:, :q]), rtol=1e-4)
    assert np.isclose(float(st["s_over_f_last"]), rms(s[:, -q:]) / rms(f[:, -q:]), rtol=1e-4)
    # a gain of zero: s = f exactly, nothing grows through the feedback
    layer.mixer.gamma_ctx.kernel[...] = jnp.zeros_like(layer.mixer.gamma_ctx.kernel[...])
    layer.mixer.gamma_bias[...] = jnp.zeros(())
    _, st0 = layer_stats(layer, x)
    assert float(st0["gamma_abs_max"]) == 0.0
    assert np.isclose(float(st0["s_over_f_first"]), 1.0, atol=1e-6)
    assert np.isclose(float(st0["s_over_f_last"]), 1.0, atol=1e-6)


def test_training_logs_stats_on_logging_steps(tmp_path):
    """A tiny Sessa run (qk norm on) with run.stability_stats: every log line of metrics.jsonl
    carries each layer's statistics, finite."""
    from sessa_jax.train import cli
    raw = {
        "model": {"family": "sessa", "d_model": 16, "n_layers": 2, "n_heads": 2,
                  "feedback_qk_norm": True},
        "data": {"task": "symbol_soup", "seq_len": 16, "num_eval_examples": 8},
        "optimizer": {"lr": 1e-2, "warmup_steps": 0},
        "mesh": {"data": 1},
        "run": {"steps": 3, "global_batch_size": 4, "log_every": 2, "eval_every": 0,
                "tensorboard": False, "stability_stats": True},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.train_main(["--config", str(path), f"run.output_dir={tmp_path}/run"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "loss" in r]
    assert [r["step"] for r in logged] == [2, 3]
    for r in logged:
        keys = {k for k in r if k.startswith("stability/")}
        assert keys == {f"stability/layer{i}/{n}" for i in range(2) for n in STAT_NAMES}
        assert all(r[k] is not None and np.isfinite(r[k]) for k in keys), r
        assert r["stability/layer0/score_max"] <= 4.0 + 1e-4  # sqrt(16): the norm is on


def test_hf_export_refuses_qk_norm():
    from sessa_jax.export.core import ExportError
    from sessa_jax.export.hf import hf_config
    m = dict(family="sessa", vocab_size=20, d_model=D, n_layers=1, n_heads=2)
    assert hf_config(ModelConfig(**m))["model_type"]
    with pytest.raises(ExportError, match="feedback_qk_norm=True"):
        hf_config(ModelConfig(**m, feedback_qk_norm=True))
