"""The chunked feedback solve against the dense reference: values, gradients, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err, xla_flags
from sessa_jax.ops.feedback import feedback_dense, feedback_solve


def _inputs(seed, B, T, D, *, sharp=1.0, gamma_scale=1.0, dtype=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    dtype = dtype or jnp.asarray(0.0).dtype
    q = sharp * jax.random.normal(ks[0], (B, T, D), dtype)
    k = jax.random.normal(ks[1], (B, T, D), dtype)
    f = jax.random.normal(ks[2], (B, T, D), dtype)
    # gamma_scale >> 1 pushes gamma against +-0.999
    g = (0.999 * jnp.tanh(gamma_scale * jax.random.normal(ks[3], (B, T), dtype))).astype(dtype)
    w = jax.random.normal(ks[4], (B, T, D), dtype)
    return q, k, g, f, w


def _value_and_grads(impl, chunk, q, k, g, f, w):
    def loss(q, k, g, f):
        return jnp.sum(feedback_solve(q, k, g, f, impl=impl, chunk_size=chunk) * w)

    s = feedback_solve(q, k, g, f, impl=impl, chunk_size=chunk)
    return s, jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, g, f)


# (B, T, D, chunk, sharpness, gamma scale): odd T, T = 1, T not a multiple of the chunk,
# T smaller than the chunk, sharp and diffuse attention, gamma near +-gamma_max.
CASES = [
    (2, 37, 8, 8, 1.0, 1.0),
    (1, 1, 4, 8, 1.0, 1.0),
    (3, 20, 6, 7, 4.0, 30.0),
    (2, 9, 8, 16, 0.05, 30.0),
    (1, 33, 5, 4, 2.0, 3.0),
]


@pytest.mark.parametrize("B,T,D,chunk,sharp,gscale", CASES)
def test_chunked_equals_dense_float64(B, T, D, chunk, sharp, gscale, x64):
    seed = int(np.random.SeedSequence().generate_state(1)[0] % 2**31)  # fresh every run
    args = _inputs(seed, B, T, D, sharp=sharp, gamma_scale=gscale)
    s_d, g_d = _value_and_grads("dense", chunk, *args)
    s_c, g_c = _value_and_grads("chunked", chunk, *args)
    assert rel_err(s_c, s_d) <= 1e-9, seed
    for name, a, b in zip(("q_b", "k_b", "gamma", "f"), g_c, g_d):
        assert rel_err(a, b) <= 1e-9, (name, seed)


@pytest.mark.parametrize("B,T,D,chunk,sharp,gscale", [CASES[0], CASES[2]])
def test_looped_sweep_equals_dense_float64(B, T, D, chunk, sharp, gscale, x64):
    """unroll=0: the sweep keeps its segment loops (what long sequences get) instead of one
    inlined step per chunk (what the cases above get: they have at most 8 chunks)."""
    seed = int(np.random.SeedSequence().generate_state(1)[0] % 2**31)
    q, k, g, f, w = _inputs(seed, B, T, D, sharp=sharp, gamma_scale=gscale)

    def loss(impl):
        return lambda q, k, g, f: jnp.sum(
            feedback_solve(q, k, g, f, impl=impl, chunk_size=chunk, unroll=0) * w)

    vd, gd = jax.jit(jax.value_and_grad(loss("dense"), argnums=(0, 1, 2, 3)))(q, k, g, f)
    vc, gc = jax.jit(jax.value_and_grad(loss("chunked"), argnums=(0, 1, 2, 3)))(q, k, g, f)
    assert abs(float(vc - vd)) <= 1e-9 * abs(float(vd)), seed
    for name, a, b in zip(("q_b", "k_b", "gamma", "f"), gc, gd):
        assert rel_err(a, b) <= 1e-9, (name, seed)


def test_chunked_float32_and_vmap():
    args = _inputs(5, 2, 29, 8)
    s_d, g_d = _value_and_grads("dense", 8, *args)
    s_c, g_c = _value_and_grads("chunked", 8, *args)
    assert rel_err(s_c, s_d) <= 1e-4
    for a, b in zip(g_c, g_d):
        assert rel_err(a, b) <= 1e-4
    # vmap over an extra leading axis equals the batched call
    q, k, g, f, _ = args
    solve = lambda q, k, g, f: feedback_solve(q[None], k[None], g[None], f[None], chunk_size=8)[0]
    s_v = jax.vmap(solve)(q, k, g, f)
    np.testing.assert_allclose(s_v, s_c, rtol=1e-5, atol=1e-5)


def test_chunked_bfloat16_inputs_close_to_float32():
    q, k, g, f, _ = _inputs(11, 1, 40, 16)
    ref = feedback_dense(q, k, g, f)
    bf = lambda x: x.astype(jnp.bfloat16)
    s = feedback_solve(bf(q), bf(k), bf(g), bf(f), chunk_size=16)
    assert s.dtype == jnp.bfloat16
    assert rel_err(s.astype(jnp.float32), ref) <= 3e-2


def test_solution_satisfies_the_recurrence(x64):
    """s_t = f_t + gamma_t sum_{j<t} alpha[t, j] s_j, checked row by row."""
    q, k, g, f, _ = _inputs(3, 1, 12, 4)
    s = np.asarray(feedback_solve(q, k, g, f, chunk_size=5))[0]
    qn, kn, gn, fn = (np.asarray(a)[0] for a in (q, k, g, f))
    np.testing.assert_allclose(s[0], fn[0], rtol=1e-12)
    for t in range(1, 12):
        sc = qn[t] @ kn[:t].T / 2.0
        a = np.exp(sc - sc.max())
        a /= a.sum()
        np.testing.assert_allclose(s[t], fn[t] + gn[t] * (a @ s[:t]), rtol=1e-10, atol=1e-12)


def _grad_temp_bytes(impl, T, D=16, chunk=64):
    def loss(q, k, g, f):
        return jnp.sum(feedback_solve(q, k, g, f, impl=impl, chunk_size=chunk))

    spec = jax.ShapeDtypeStruct((1, T, D), jnp.float32)
    gspec = jax.ShapeDtypeStruct((1, T), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(spec, spec, gspec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly_dense_quadratically():
    c1, c4 = _grad_temp_bytes("chunked", 512), _grad_temp_bytes("chunked", 2048)
    d1, d4 = _grad_temp_bytes("dense", 512), _grad_temp_bytes("dense", 2048)
    assert c4 <= 5 * c1, (c1, c4)
    assert d4 >= 10 * d1, (d1, d4)
    assert c4 < d4 / 4


_SHARDED_SOLVE = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sessa_jax.ops.feedback import feedback_solve
mesh = Mesh(np.array(jax.devices()), ("data",))
B, T, D = 64, 128, 64
k = jax.random.split(jax.random.key(0), 4)
q, kb, f = (jax.random.normal(x, (B, T, D)) for x in k[:3])
g = 0.9 * jnp.tanh(jax.random.normal(k[3], (B, T)))
args = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (q, kb, g, f)]
for impl in ("chunked", "dense"):
    loss = lambda q, kb, g, f: jnp.sum(feedback_solve(q, kb, g, f, impl=impl, chunk_size=64) ** 2)
    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 3)))(*args))
    print(impl, "done", flush=True)
"""


def test_batch_sharded_solve_on_two_cpu_devices_finishes():
    """Regression: jaxlib's batched CPU trsm waits on XLA's intra-op pool, and two devices
    solving at once on a 2-core host deadlocked (a training step that never returned)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
    try:
        p = subprocess.run([sys.executable, "-c", _SHARDED_SOLVE], env=env, capture_output=True,
                           text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the batch-sharded feedback solve on 2 CPU devices did not finish in 180 s")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "chunked done" in p.stdout and "dense done" in p.stdout


@pytest.mark.parametrize("B,T,D,chunk,sharp,gscale", [CASES[0], CASES[2]])
def test_chunked_doubling_inverse_equals_dense_float64(B, T, D, chunk, sharp, gscale, x64):
    seed = int(np.random.SeedSequence().generate_state(1)[0] % 2**31)
    q, k, g, f, w = _inputs(seed, B, T, D, sharp=sharp, gamma_scale=gscale)

    def loss(impl, inverse):
        return lambda q, k, g, f: jnp.sum(
            feedback_solve(q, k, g, f, impl=impl, chunk_size=chunk, inverse=inverse) * w)

    vd, gd = jax.jit(jax.value_and_grad(loss("dense", "solve"), argnums=(0, 1, 2, 3)))(q, k, g, f)
    vc, gc = jax.jit(jax.value_and_grad(loss("chunked", "doubling"), argnums=(0, 1, 2, 3)))(
        q, k, g, f)
    assert abs(float(vc - vd)) <= 1e-9 * abs(float(vd)), seed
    for name, a, b in zip(("q_b", "k_b", "gamma", "f"), gc, gd):
        assert rel_err(a, b) <= 1e-9, (name, seed)


def test_bf16_inputs_with_float32_gamma():
    """The layer computes gamma in float32 with bf16 activations: s comes back in bf16, dgamma
    in float32, both close to the float32 reference."""
    q, k, g, f, w = _inputs(12, 1, 40, 16)
    bf = lambda x: x.astype(jnp.bfloat16)

    def loss(q, k, g, f):
        return jnp.sum(feedback_solve(q, k, g, f, chunk_size=16).astype(jnp.float32) * w)

    s = feedback_solve(bf(q), bf(k), g, bf(f), chunk_size=16)
    assert s.dtype == jnp.bfloat16
    assert rel_err(s.astype(jnp.float32), feedback_dense(q, k, g, f)) <= 3e-2
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(bf(q), bf(k), g, bf(f))
    ref = jax.grad(lambda *a: jnp.sum(feedback_dense(*a) * w), argnums=(0, 1, 2, 3))(q, k, g, f)
    assert [x.dtype for x in grads] == [jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.bfloat16]
    for a, b in zip(grads, ref):
        assert rel_err(a.astype(jnp.float32), b) <= 3e-2


def test_decode_step_does_not_cast_the_cache():
    """feedback_decode_step accumulates in float32 inside the products: no (B, L, D) convert."""
    from sessa_jax.ops.feedback import feedback_decode_step

    B, L, D = 2, 7, 8
    bf = jax.ShapeDtypeStruct
    args = (bf((B, D), jnp.bfloat16), bf((B, L, D), jnp.bfloat16), bf((B, L, D), jnp.bfloat16),
            bf((B,), jnp.float32), bf((B, D), jnp.bfloat16), bf((B,), jnp.int32))
    jaxpr = jax.make_jaxpr(feedback_decode_step)(*args).jaxpr
    casts = [e for e in jaxpr.eqns if e.primitive.name == "convert_element_type"
             and e.outvars[0].aval.shape == (B, L, D)]
    assert not casts


@pytest.mark.parametrize("c,base", [(7, 4), (20, 4), (130, 64)])
def test_block_inverses_equal_the_triangular_solve(c, base, x64):
    """The matmul-only diagonal-block inverses (doubling, recursive blocks with identity
    padding to base * 2^k) equal a unit lower-triangular solve."""
    from jax.scipy.linalg import solve_triangular
    from sessa_jax.ops.feedback import _blocked_inverse, _doubling_inverse

    a = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(c), (2, c, c)), axis=-1)
    n = 0.999 * jnp.tril(a, -1)
    eye = jnp.broadcast_to(jnp.eye(c), (2, c, c))
    ref = solve_triangular(eye - n, eye, lower=True, unit_diagonal=True)
    np.testing.assert_allclose(_blocked_inverse(n, base=base), ref, atol=1e-13)
    np.testing.assert_allclose(_doubling_inverse(n), ref, atol=1e-13)


def test_chunked_blocked_inverse_equals_dense_float64(x64):
    """inverse='blocked' with a chunk above the 64-row base (72: padded to 128)."""
    q, k, g, f, w = _inputs(21, 1, 150, 4, gamma_scale=30.0)

    def loss(impl):
        return lambda q, k, g, f: jnp.sum(
            feedback_solve(q, k, g, f, impl=impl, chunk_size=72, inverse="blocked") * w)

    vd, gd = jax.jit(jax.value_and_grad(loss("dense"), argnums=(0, 1, 2, 3)))(q, k, g, f)
    vc, gc = jax.jit(jax.value_and_grad(loss("chunked"), argnums=(0, 1, 2, 3)))(q, k, g, f)
    assert abs(float(vc - vd)) <= 1e-9 * abs(float(vd))
    for name, a, b in zip(("q_b", "k_b", "gamma", "f"), gc, gd):
        assert rel_err(a, b) <= 1e-9, name


def test_chunked_without_saved_inverses_equals_dense_float64(x64):
    """keep_inverses=False (block inverses recomputed in the backward step from its own
    tile), looped sweep, packed documents: gradients equal the dense solve's."""
    seed = int(np.random.SeedSequence().generate_state(1)[0] % 2**31)
    q, k, g, f, w = _inputs(seed, 2, 37, 8, gamma_scale=3.0)
    seg = jnp.cumsum(jax.random.bernoulli(jax.random.PRNGKey(seed), 0.1, (2, 37)), axis=1)

    def loss(impl):
        return lambda q, k, g, f: jnp.sum(w * feedback_solve(
            q, k, g, f, impl=impl, chunk_size=4, unroll=0, segment_ids=seg,
            keep_inverses=False))

    gd = jax.jit(jax.grad(loss("dense"), argnums=(0, 1, 2, 3)))(q, k, g, f)
    gc = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1, 2, 3)))(q, k, g, f)
    for name, a, b in zip(("q_b", "k_b", "gamma", "f"), gc, gd):
        assert rel_err(a, b) <= 1e-9, (name, seed)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_saved_residual_dtypes(dtype):
    """What the chunked solve keeps for the backward pass: s and ctx in f's dtype for bf16
    (ctx in float32 for float32), lse in float32, block inverses only with keep_inverses."""
    import contextlib
    import io
    import re

    q, k, g, f, _ = _inputs(0, 1, 64, 8, dtype=jnp.dtype(dtype))
    for keep in (True, False):
        loss = lambda q, k, g, f: jnp.sum(feedback_solve(
            q, k, g.astype(jnp.float32), f, chunk_size=8, unroll=0,
            keep_inverses=keep).astype(jnp.float32))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            jax.ad_checkpoint.print_saved_residuals(loss, q, k, g, f)
        named = dict((n, t) for t, n in re.findall(r"(\w+)\[[\d,]*\]\s+named '(\w+)'",
                                                   buf.getvalue()))
        half = "bf16" if dtype == "bfloat16" else "f32"
        want = {"feedback_s": half, "feedback_ctx": half, "feedback_lse": "f32"}
        if keep:
            want["feedback_inv"] = half
        assert named == want, buf.getvalue()
