"""The LM head's product in a 16-bit compute dtype: float32 logits, and a backward pass whose
products take 16-bit operands (plain autodiff promotes them to float32: TF32 GEMMs on a GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sessa_jax.models.lm import _head_logits


@pytest.mark.parametrize("spec,wshape", [("...d,vd->...v", (11, 6)), ("...d,dv->...v", (6, 11))])
def test_head_gradients_and_backward_operand_dtypes(spec, wshape):
    k = jax.random.split(jax.random.key(7), 3)
    h = jax.random.normal(k[0], (2, 5, 6), jnp.float32)
    w = jax.random.normal(k[1], wshape, jnp.float32)
    c = jax.random.normal(k[2], (2, 5, 11), jnp.float32)

    def f(h, w, dt):
        return jnp.sum(_head_logits(spec, h.astype(dt), w.astype(dt)) * c)

    ref = jax.grad(lambda h, w: jnp.sum(jnp.einsum(spec, h, w) * c), argnums=(0, 1))(h, w)
    for dt, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
        got = jax.grad(f, argnums=(0, 1))(h, w, dt)
        for a, r in zip(got, ref):
            np.testing.assert_allclose(np.asarray(a, np.float32), r, rtol=tol,
                                       atol=tol * float(jnp.abs(r).max()))
    assert _head_logits(spec, h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).dtype == jnp.float32
    # the two backward products: bf16 operands (float32 accumulation), none in float32
    txt = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2).lower(
        h, w, jnp.bfloat16).as_text()
    dots = [l for l in txt.splitlines() if "dot_general" in l]
    assert len(dots) == 2, dots
    for l in dots:
        operands = l.split(":")[-1].split("->")[0]
        assert "bf16" in operands and "f32" not in operands, l
