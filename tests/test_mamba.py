"""Selective scan implementations and the Mamba-1 block: parity, caching, padding, sharding names."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sessa_jax.models.config import MambaConfig
from sessa_jax.models.mamba import MambaBlock, MambaCache
from sessa_jax.ops.ssm import selective_scan, selective_scan_step


@pytest.fixture
def x64():
    """float64 for 1e-10 parity, restored afterwards so other test files are unaffected."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def scan_inputs(key, B, T, E, N, with_h0, dtype=jnp.float64):
    ks = jax.random.split(key, 7)
    x = jax.random.normal(ks[0], (B, T, E), dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, E), dtype) - 1.0)
    A = -jnp.exp(jax.random.normal(ks[2], (E, N), dtype))
    Bm = jax.random.normal(ks[3], (B, T, N), dtype)
    Cm = jax.random.normal(ks[4], (B, T, N), dtype)
    Dskip = jax.random.normal(ks[5], (E,), dtype)
    h0 = jax.random.normal(ks[6], (B, E, N), dtype) if with_h0 else None
    return x, dt, A, Bm, Cm, Dskip, h0


def _scan_fn(impl, chunk):
    return jax.jit(lambda *a: selective_scan(*a, impl=impl, chunk_size=chunk))


# T odd / T = 1 / T not a multiple of the chunk / T a multiple / chunk > T; with and without h0.
@pytest.mark.parametrize(
    "T,chunk,with_h0", [(7, 3, True), (1, 4, True), (10, 4, False), (8, 4, True), (5, 16, False)]
)
def test_scan_impls_match_sequential(x64, T, chunk, with_h0):
    args = scan_inputs(jax.random.key(T), 2, T, 3, 4, with_h0)
    y_ref, h_ref = _scan_fn("sequential", chunk)(*args)
    assert y_ref.dtype == jnp.float64 and y_ref.shape == (2, T, 3) and h_ref.shape == (2, 3, 4)
    for impl in ("associative", "chunked"):
        y, h = _scan_fn(impl, chunk)(*args)
        assert rel_err(y, y_ref) <= 1e-10, impl
        assert rel_err(h, h_ref) <= 1e-10, impl


def test_sequential_matches_explicit_loop_and_step(x64):
    """The reference itself against a NumPy loop of the documented recurrence and the step fn."""
    x, dt, A, Bm, Cm, Dskip, h0 = scan_inputs(jax.random.key(3), 2, 5, 3, 4, True)
    y, hT = selective_scan(x, dt, A, Bm, Cm, Dskip, h0, impl="sequential")
    xn, dtn, An, Bn, Cn, Dn, h = map(np.asarray, (x, dt, A, Bm, Cm, Dskip, h0))
    hs = jnp.asarray(h0)
    for t in range(5):
        h = np.exp(dtn[:, t, :, None] * An) * h + (dtn[:, t] * xn[:, t])[..., None] * Bn[:, t, None]
        y_t = np.einsum("ben,bn->be", h, Cn[:, t]) + Dn * xn[:, t]
        assert rel_err(y[:, t], y_t) <= 1e-12
        ys, hs = selective_scan_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], Dskip, hs)
        assert rel_err(ys, y_t) <= 1e-12
    assert rel_err(hT, h) <= 1e-12 and rel_err(hs, h) <= 1e-12


def test_scan_gradients_match_sequential(x64):
    x, dt, A, Bm, Cm, Dskip, h0 = scan_inputs(jax.random.key(11), 2, 7, 3, 4, True)
    ky, kh = jax.random.split(jax.random.key(12))
    wy = jax.random.normal(ky, x.shape, x.dtype)
    wh = jax.random.normal(kh, h0.shape, x.dtype)

    def grads(impl):
        def loss(x, dt, A, Bm, Cm, Dskip, h0):
            y, h = selective_scan(x, dt, A, Bm, Cm, Dskip, h0, impl=impl, chunk_size=3)
            return jnp.sum(y * wy) + jnp.sum(h * wh)

        return jax.jit(jax.grad(loss, argnums=tuple(range(7))))(x, dt, A, Bm, Cm, Dskip, h0)

    ref = grads("sequential")
    names = ("x", "dt", "A", "B", "C", "D", "h0")
    for impl in ("associative", "chunked"):
        for name, g, r in zip(names, grads(impl), ref):
            assert rel_err(g, r) <= 1e-10, (impl, name)


# ---------------------------------------------------------------------------------- the block

def f64_cfg(**kw):
    base = dict(d_model=8, d_state=4, expand=2, d_conv=4, chunk_size=3,
                dtype="float64", param_dtype="float64")
    base.update(kw)
    return MambaConfig(**base)


def make_block(cfg, seed=0):
    return MambaBlock(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def _fwd(block, x):
    return block(x)


@nnx.jit
def _prefill(block, x, cache, lengths):
    return block.prefill(x, cache, lengths)


@nnx.jit
def _prefill_full(block, x, cache):
    return block.prefill(x, cache)


@nnx.jit
def _decode(block, x_t, cache):
    return block.decode_step(x_t, cache)


def test_init_values(x64):
    cfg = f64_cfg(d_state=5, dt_min=2e-3, dt_max=5e-2)
    b = make_block(cfg)
    E, N = cfg.d_inner, cfg.d_state
    assert b.A_log[...].shape == (E, N) and b.A_log[...].dtype == jnp.float64
    np.testing.assert_allclose(np.exp(b.A_log[...]), np.broadcast_to(np.arange(1, N + 1), (E, N)))
    np.testing.assert_array_equal(b.D[...], np.ones(E))
    dt = np.asarray(jax.nn.softplus(b.dt_proj.bias[...]))
    assert np.all(dt >= 2e-3 * (1 - 1e-9)) and np.all(dt <= 5e-2 * (1 + 1e-9))
    assert b.conv_kernel[...].shape == (cfg.d_conv, E)
    assert b.x_proj.kernel[...].shape == (E, cfg.rank + 2 * N)
    assert b.in_proj.bias is None and b.out_proj.bias is None and b.x_proj.bias is None


def test_block_scan_impls_agree(x64):
    x = jax.random.normal(jax.random.key(1), (2, 7, 8), jnp.float64)
    ys = {impl: _fwd(make_block(f64_cfg(scan_impl=impl)), x) for impl in ("sequential", "associative", "chunked")}
    assert ys["chunked"].shape == x.shape and ys["chunked"].dtype == jnp.float64
    for impl in ("associative", "chunked"):
        assert rel_err(ys[impl], ys["sequential"]) <= 1e-10, impl


def test_prefill_then_decode_matches_full(x64):
    block = make_block(f64_cfg())
    B, T, P = 2, 7, 3
    x = jax.random.normal(jax.random.key(2), (B, T, 8), jnp.float64)
    y_full = _fwd(block, x)

    cache = block.init_cache(B, max_len=T)
    assert isinstance(cache, MambaCache)
    assert cache.conv.shape == (B, 3, 16) and cache.ssm.shape == (B, 16, 4)
    assert cache.pos.dtype == jnp.int32
    y_pre, cache = _prefill_full(block, x[:, :P], cache)
    assert rel_err(y_pre, y_full[:, :P]) <= 1e-10
    for t in range(P, T):
        y_t, cache = _decode(block, x[:, t : t + 1], cache)
        assert y_t.shape == (B, 1, 8)
        assert rel_err(y_t, y_full[:, t : t + 1]) <= 1e-10, t
    np.testing.assert_array_equal(cache.pos, [T, T])

    # decoding from the very first token (empty cache, conv history all zeros)
    cache = block.init_cache(B, max_len=T)
    for t in range(T):
        y_t, cache = _decode(block, x[:, t : t + 1], cache)
        assert rel_err(y_t, y_full[:, t : t + 1]) <= 1e-10, t


def test_padded_prefill_matches_per_row(x64):
    block = make_block(f64_cfg(), seed=3)
    T, n_dec = 7, 2
    lengths = jnp.array([7, 4, 2, 1], jnp.int32)  # 2, 1 < d_conv - 1: window reaches history
    B = lengths.shape[0]
    x = jax.random.normal(jax.random.key(4), (B, T, 8), jnp.float64)
    x_dec = jax.random.normal(jax.random.key(5), (B, n_dec, 8), jnp.float64)
    # Garbage in the pad positions must not leak into the cache.
    pad = jnp.arange(T)[None, :, None] >= lengths[:, None, None]
    x = jnp.where(pad, 1e3, x)

    y_pad, cache = _prefill(block, x, block.init_cache(B, T), lengths)
    np.testing.assert_array_equal(cache.pos, lengths)
    dec = []
    for t in range(n_dec):
        y_t, cache = _decode(block, x_dec[:, t : t + 1], cache)
        dec.append(y_t)
    np.testing.assert_array_equal(cache.pos, lengths + n_dec)

    for b in range(B):
        L = int(lengths[b])
        y_row, c_row = _prefill_full(block, x[b : b + 1, :L], block.init_cache(1, T))
        assert rel_err(y_pad[b, :L], y_row[0]) <= 1e-10, b
        for t in range(n_dec):
            y_t, c_row = _decode(block, x_dec[b : b + 1, t : t + 1], c_row)
            assert rel_err(dec[t][b], y_t[0]) <= 1e-10, (b, t)


def test_jit_matches_eager(x64):
    block = make_block(f64_cfg(), seed=7)
    x = jax.random.normal(jax.random.key(8), (2, 5, 8), jnp.float64)
    lengths = jnp.array([5, 3], jnp.int32)
    assert rel_err(_fwd(block, x), block(x)) <= 1e-12

    y_e, c_e = block.prefill(x, block.init_cache(2, 8), lengths)
    y_j, c_j = _prefill(block, x, block.init_cache(2, 8), lengths)
    for a, b in ((y_e, y_j), (c_e.conv, c_j.conv), (c_e.ssm, c_j.ssm)):
        assert rel_err(b, a) <= 1e-12
    np.testing.assert_array_equal(c_e.pos, c_j.pos)
    y_e, _ = block.decode_step(x[:, :1], c_e)
    y_j, _ = _decode(block, x[:, :1], c_j)
    assert rel_err(y_j, y_e) <= 1e-12

    # split/merge functional style, as a training step would use it
    graphdef, state = nnx.split(block)
    y_s = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    assert rel_err(y_s, block(x)) <= 1e-12


def test_every_param_has_logical_axes():
    block = make_block(MambaConfig(d_model=16, d_state=4))
    specs = nnx.get_partition_spec(nnx.state(block, nnx.Param))
    leaves = jax.tree.leaves(nnx.state(block, nnx.Param))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert len(leaves) == len(spec_leaves) == 11
    allowed = {"embed", "mlp", "state", "conv", "norm", None}
    for v, s in zip(leaves, spec_leaves):
        assert len(s) == v.ndim, (v.shape, s)
        assert any(n is not None for n in s), (v.shape, s)
        assert set(s) <= allowed, s


def test_bf16_compute_keeps_f32_state():
    cfg = MambaConfig(d_model=16, d_state=4, dtype="bfloat16", chunk_size=4)
    block = make_block(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 6, 16), jnp.bfloat16)
    cache = block.init_cache(2, 6)
    assert cache.ssm.dtype == jnp.float32 and cache.conv.dtype == jnp.bfloat16
    y, cache = _prefill(block, x, cache, jnp.array([6, 3], jnp.int32))
    assert y.dtype == jnp.bfloat16 and cache.ssm.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    assert math.isfinite(float(jnp.abs(cache.ssm).max()))
