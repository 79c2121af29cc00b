"""mixed_einsum: 16-bit operands, float32 accumulation, and a backward whose products take 16-bit
operands (plain autodiff promotes them to float32 with the float32 cotangent: TF32 GEMMs on a
GPU). Checked on the einsum alone and on its users' backward passes (the SSD scan)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops.mixed_einsum import mixed_einsum
from sessa_jax.ops.ssd import ssd_chunked


def _dot_operand_dtypes(txt):
    """The operand dtypes of every dot_general in lowered StableHLO text."""
    dots = [l for l in txt.splitlines() if "dot_general" in l]
    return dots, [l.split(":")[-1].split("->")[0] for l in dots]


# a matmul, the LM head's "...d,vd->...v", and a batched product like the SSD's intra-chunk one
SPECS = [("ij,jk->ik", (5, 6), (6, 7)), ("...d,vd->...v", (2, 3, 6), (9, 6)),
         ("bcgkij,bcjgkp->bcigkp", (2, 3, 1, 2, 4, 4), (2, 3, 4, 1, 2, 5))]


@pytest.mark.parametrize("spec,sa,sb", SPECS, ids=[s[0] for s in SPECS])
def test_gradients_match_float32_and_backward_products_are_bf16(spec, sa, sb):
    k = jax.random.split(jax.random.key(3), 3)
    a = jax.random.normal(k[0], sa, jnp.float32)
    b = jax.random.normal(k[1], sb, jnp.float32)
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), a, b).shape
    c = jax.random.normal(k[2], out_shape, jnp.float32)

    def f(a, b, dt):
        return jnp.sum(mixed_einsum(spec, a.astype(dt), b.astype(dt)) * c)

    ref = jax.grad(lambda a, b: jnp.sum(jnp.einsum(spec, a, b) * c), argnums=(0, 1))(a, b)
    for dt, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        got = jax.grad(f, argnums=(0, 1))(a, b, dt)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=tol,
                                       atol=tol * float(jnp.abs(r).max()))
    bf = jnp.bfloat16
    assert mixed_einsum(spec, a.astype(bf), b.astype(bf)).dtype == jnp.float32
    dots, ops = _dot_operand_dtypes(
        jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2).lower(a, b, bf).as_text())
    assert len(dots) == 2, dots  # the two backward products (the forward's is not needed)
    for l, o in zip(dots, ops):
        assert "bf16" in o and "f32" not in o, l


def test_float64_and_float32_operands_differentiate_as_plain_einsum(x64):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)))
    b = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2)))
    for dt in (jnp.float64, jnp.float32):
        got = jax.grad(lambda a, b: mixed_einsum("ij,jk->ik", a, b, acc=dt).sum(), (0, 1))(
            a.astype(dt), b.astype(dt))
        want = jax.grad(lambda a, b: (a @ b).sum(), (0, 1))(a.astype(dt), b.astype(dt))
        for g, w in zip(got, want):
            assert g.dtype == dt
            np.testing.assert_allclose(g, w, rtol=1e-6)


def test_a_spec_it_cannot_transpose_is_refused_by_name():
    a = jnp.ones((2, 3), jnp.bfloat16)
    with pytest.raises(ValueError, match="index 'j' of the first operand"):
        mixed_einsum("ij,ik->ik", a, a)
    with pytest.raises(ValueError, match="explicit"):
        mixed_einsum("ij,jk", a, a.T)


def test_ssd_backward_runs_every_product_on_bf16_operands():
    """The SSD scan's forward and backward products in a bf16 model: bf16 operands only."""
    rng = np.random.default_rng(4)
    B, T, H, P, N, Q = 1, 12, 2, 4, 3, 4
    x = jnp.asarray(rng.standard_normal((B, T, H, P)), jnp.bfloat16)
    dt = jax.nn.softplus(jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32))
    A = -jnp.exp(jnp.asarray(rng.standard_normal(H), jnp.float32))
    Bm = jnp.asarray(rng.standard_normal((B, T, 1, N)), jnp.bfloat16)
    Cm = jnp.asarray(rng.standard_normal((B, T, 1, N)), jnp.bfloat16)

    def loss(x, dt, Bm, Cm):
        y, h = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=Q)
        return jnp.sum(y ** 2) + jnp.sum(h ** 2)

    dots, ops = _dot_operand_dtypes(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, dt, Bm, Cm).as_text())
    assert len(dots) >= 12, dots  # 4 forward products, 2 backward products each
    for l, o in zip(dots, ops):
        assert "bf16" in o and "f32" not in o, l
