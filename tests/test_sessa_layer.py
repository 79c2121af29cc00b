"""The Sessa layer against the author's PyTorch implementation (tests/fixtures/*.npz)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES, fixture_config, rel_err
from sessa_jax.interop import (
    _name_table, layer_from_reference, layer_to_reference, load_reference_state,
)
from sessa_jax.models import SessaConfig, SessaLayer

assert FIXTURES, "tests/fixtures/sessa_layer_*.npz are missing"


def _forward_and_grads(layer, x, w):
    """-> (layer(x), (d state, d x) of sum(layer(x) * w)): one compiled program for both (the
    eager forward compiles op by op, several times slower; eager == jit is checked on its own
    in test_jit_matches_eager_and_decode_matches_full)."""
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        y = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * w), y

    (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
    return y, g


def _param_grad(gstate, path, transpose):
    g = gstate
    for p in path:
        g = g[p]
    g = np.asarray(g[...])
    return g.T if transpose else g


def _decode(layer, x, prefill_len):
    B, T, _ = x.shape
    cache = layer.init_cache(B, T)
    y0, cache = jax.jit(lambda xp, c: layer.prefill(xp, c))(x[:, :prefill_len], cache)
    step = jax.jit(lambda xt, c: layer.decode_step(xt, c))
    outs = [y0]
    for t in range(prefill_len, T):
        yt, cache = step(x[:, t : t + 1], cache)
        outs.append(yt)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.split("/")[-1][12:-4])
@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_parity_float64(path, impl, x64):
    cfg = fixture_config(path, feedback_impl=impl, chunk_size=8, dtype="float64",
                         param_dtype="float64")
    z = np.load(path)
    layer = layer_from_reference(load_reference_state(path), cfg)
    x = jnp.asarray(z["x"])
    y, (gstate, gx) = _forward_and_grads(layer, x, jnp.asarray(z["w_loss"]))
    assert rel_err(y, z["y"]) <= 1e-9
    assert rel_err(gx, z["grad/x"]) <= 1e-9
    # Scale for gradients that are ~0 in exact arithmetic (a key bias cancels in softmax):
    # compare those against the largest gradient instead of their own rounding noise.
    scale = max(np.linalg.norm(z[k]) for k in z.files if k.startswith("grad/"))
    for name, (p, tr) in _name_table(cfg).items():
        got, want = _param_grad(gstate, p, tr), z[f"grad/{name}"]
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-6 * scale)
        assert err <= 1e-9, (name, err)
    y_dec = _decode(layer, x, int(z["prefill_len"]))
    assert rel_err(y_dec, z["y_prefill_then_decode"]) <= 1e-9


@pytest.mark.parametrize("path", FIXTURES[-1:], ids=["gqa"])
def test_parity_float32(path):
    cfg = fixture_config(path, chunk_size=16)
    z = np.load(path)
    layer = layer_from_reference(load_reference_state(path), cfg)
    x = jnp.asarray(z["x"], jnp.float32)
    y, (gstate, gx) = _forward_and_grads(layer, x, jnp.asarray(z["w_loss"], jnp.float32))
    assert rel_err(y, z["y"]) <= 1e-4
    assert rel_err(gx, z["grad/x"]) <= 1e-4
    for name in ("W_in.weight", "mixer.proj_fb.weight", "mixer.gamma_bias", "mixer.q_proj.weight"):
        p, tr = _name_table(cfg)[name]
        assert rel_err(_param_grad(gstate, p, tr), z[f"grad/{name}"]) <= 1e-4, name
    assert rel_err(_decode(layer, x, int(z["prefill_len"])), z["y_prefill_then_decode"]) <= 1e-4


def test_export_import_roundtrip(tmp_path):
    cfg = SessaConfig(d_model=16, n_heads=2, n_kv_heads=1)
    layer = SessaLayer(cfg, rngs=nnx.Rngs(3))
    state = layer_to_reference(layer)
    from safetensors.numpy import load_file, save_file

    save_file(state, str(tmp_path / "layer.safetensors"))
    again = layer_from_reference(load_file(str(tmp_path / "layer.safetensors")), cfg)
    state2 = layer_to_reference(again)
    assert state.keys() == state2.keys()
    for k in state:
        np.testing.assert_array_equal(state[k], state2[k])
    assert "mixer.out_proj.weight" in state and state["W_in.weight"].shape == (32, 16)


def test_reference_state_errors_list_everything():
    cfg = SessaConfig(d_model=8, n_heads=1)
    state = layer_to_reference(SessaLayer(cfg, rngs=nnx.Rngs(0)))
    del state["ln.bias"]
    state["W_in.weight"] = state["W_in.weight"][:, :4]
    state["mixer.out_proj.weight"] = np.zeros((8, 8))  # H == 1 has no out_proj
    with pytest.raises(ValueError) as e:
        layer_from_reference(state, cfg)
    msg = str(e.value)
    assert "missing: ln.bias" in msg
    assert "unexpected: mixer.out_proj.weight" in msg
    assert "W_in.weight: expected shape (16, 8), got (16, 4)" in msg


def test_jit_matches_eager_and_decode_matches_full():
    cfg = SessaConfig(d_model=16, n_heads=4, n_kv_heads=2, chunk_size=4)
    layer = SessaLayer(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 11, 16))
    y = layer(x)
    y_jit = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_allclose(y_jit, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_decode(layer, x, 0 + 1), y, rtol=1e-4, atol=1e-5)


def test_prefill_lengths_right_padding():
    """A right-padded prompt with lengths gives each row what its own prompt alone gives
    (prefill and decode jitted: op-by-op eager compiles several times as much)."""
    cfg = SessaConfig(d_model=16, n_heads=2, chunk_size=4)
    layer = SessaLayer(cfg, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
    nxt = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 16))
    lengths = jnp.array([9, 5])
    prefill = jax.jit(lambda x, c, n=None: layer.prefill(x, c, n))
    decode = jax.jit(lambda x, c: layer.decode_step(x, c))
    _, cache = prefill(x, layer.init_cache(2, 12), lengths)
    y_next, _ = decode(nxt, cache)
    _, c1 = prefill(x[1:, :5], layer.init_cache(1, 12))
    y1, _ = decode(nxt[1:], c1)
    np.testing.assert_allclose(y_next[1:], y1, rtol=1e-5, atol=1e-5)


def test_cache_overflow_is_a_clear_error():
    cfg = SessaConfig(d_model=8, n_heads=2)
    layer = SessaLayer(cfg, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 4, 8))
    with pytest.raises(ValueError, match="exceeds the cache's max_len=3"):
        layer.prefill(x, layer.init_cache(1, 3))
    _, cache = layer.prefill(x, layer.init_cache(1, 4))
    with pytest.raises(ValueError, match="overflow.*max_len=4"):
        layer.decode_step(x[:, :1], cache)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(d_model=10, n_heads=4), "n_heads"),
        (dict(d_model=12, n_heads=4), "use_rope"),  # head dim 3 is odd
        (dict(d_model=16, n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(d_model=16, n_heads=4, gamma_max=1.0), "gamma_max"),
        (dict(d_model=16, n_heads=4, gamma_max=0.0), "gamma_max"),
        (dict(d_model=16, n_heads=4, feedback_impl="fast"), "feedback_impl"),
        (dict(d_model=16, n_heads=4, dtype="float8"), "dtype"),
    ],
)
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SessaConfig(**kw)


def test_staged_layer_remat_same_gradients_fewer_residuals():
    """layer_remat='staged' (packed rows, looped sweep): the same loss and gradients as the
    plain layer, and across the forward/backward boundary it keeps only x, the solve's
    inputs q_b, k_b, gamma and its named residuals s, ctx, lse (no block inverses)."""
    import contextlib
    import io
    import re

    from sessa_jax.models.config import ModelConfig

    B, T, D = 2, 24, 16
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    seg = jnp.cumsum(jax.random.bernoulli(jax.random.key(2), 0.15, (B, T)), axis=1)
    w = jax.random.normal(jax.random.key(3), (B, T, D))
    out, saved = {}, {}
    for mode in ("none", "staged"):
        layer = SessaLayer(SessaConfig(d_model=D, n_heads=2, chunk_size=8, feedback_unroll=0,
                                       layer_remat=mode), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(layer)
        loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x, seg) * w)
        out[mode] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(state, x)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            jax.ad_checkpoint.print_saved_residuals(loss, state, x)
        saved[mode] = [l for l in buf.getvalue().splitlines()
                       if l.startswith(f"f32[{B},{T}") and "from the argument" not in l
                       and "from a constant" not in l]
    (v0, g0), (v1, g1) = out["none"], out["staged"]
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert rel_err(a, b) < 1e-5
    names = set(re.findall(r"named '(\w+)'", "\n".join(saved["staged"])))
    assert names == {"feedback_s", "feedback_ctx", "feedback_lse"}, saved["staged"]
    shapes = sorted(l.split()[0] for l in saved["staged"])
    assert shapes == sorted([f"f32[{B},{T}]"] * 2 + [f"f32[{B},{T},{D}]"] * 4), saved["staged"]
    assert len(saved["none"]) > 3 * len(saved["staged"])
    assert ModelConfig(layer_remat="staged").block_config().layer_remat == "staged"
    with pytest.raises(ValueError, match="layer_remat"):
        SessaConfig(d_model=D, n_heads=2, layer_remat="full")
