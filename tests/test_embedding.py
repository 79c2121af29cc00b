"""ops/embedding.py: the lookup and both backward passes against the plain gather, and the
reason it exists (nnx.Embed sums the table's gradient in bfloat16)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.ops.embedding import embed_lookup


@pytest.mark.parametrize("grad", ["scatter", "onehot"])
@pytest.mark.parametrize("seed,shape,chunk", [(0, (3, 7), 4), (1, (1, 1), 4096), (2, (2, 16), 8)])
def test_lookup_and_gradient_match_the_gather_float64(grad, seed, shape, chunk):
    with jax.enable_x64(True):
        V, D = 37, 5
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        tab = jax.random.normal(k1, (V, D), jnp.float64)
        ids = jax.random.randint(k2, shape, 0, V)
        w = jax.random.normal(k3, shape + (D,), jnp.float64)
        out = embed_lookup(tab, ids, jnp.float64, grad=grad, chunk=chunk)
        np.testing.assert_array_equal(out, tab[ids])
        got = jax.grad(lambda t: jnp.sum(embed_lookup(t, ids, jnp.float64, grad=grad,
                                                       chunk=chunk) * w))(tab)
        ref = jax.grad(lambda t: jnp.sum(t[ids] * w))(tab)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", ["scatter", "onehot"])
def test_bf16_compute_sums_a_frequent_token_in_float32(grad):
    """4096 occurrences of one token, each adding 1e-3: a bfloat16 sum stalls at 0.5 (the
    adds fall below half an ulp), which is what gathering from a bf16 copy of the table did."""
    tab = jnp.zeros((4, 8), jnp.float32)
    ids = jnp.zeros((4096,), jnp.int32)
    gw = jnp.full((4096, 8), 1e-3, jnp.bfloat16)
    exact = 4096 * float(jnp.bfloat16(1e-3))

    def loss(t, lookup):
        return jnp.sum(lookup(t).astype(jnp.float32) * gw)

    ours = jax.grad(loss)(tab, lambda t: embed_lookup(t, ids, jnp.bfloat16, grad=grad))
    assert ours.dtype == jnp.float32 and float(ours[0, 0]) == pytest.approx(exact, rel=1e-6)
    old = jax.grad(loss)(tab, lambda t: jnp.take(t.astype(jnp.bfloat16), ids, axis=0))
    assert float(old[0, 0]) < 0.5 * exact  # the bug this op fixes, still there in the old way


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="grad='sparse'"):
        embed_lookup(jnp.zeros((3, 2)), jnp.zeros((2,), jnp.int32), jnp.float32, grad="sparse")
    with pytest.raises(ValueError, match="ids must be integers"):
        embed_lookup(jnp.zeros((3, 2)), jnp.zeros((2,)), jnp.float32)
