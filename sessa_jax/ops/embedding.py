"""Token embedding lookup whose gradient is accumulated in the table's own dtype.

``embed_lookup(table, ids, dtype)``: table (V, D) in the parameter dtype (float32), ids (...)
int -> (..., D) rows in ``dtype`` (the compute dtype).

Why not ``nnx.Embed``: it casts the whole table to the compute dtype and gathers from the cast,
so the backward pass is a scatter-add *in bfloat16* into a (V, D) bfloat16 buffer: every
occurrence of a frequent token adds into the same row with bf16 rounding (thousands of adds of
small gradients into one bf16 row lose most of them), and on a GPU the bf16 atomics that do it
serialise on repeated ids. Measured on one H200 (BENCHMARKS.md, 2026-12-03): that one scatter
was 40% of a 125M model's training step on MQAR (88 ms of 221 ms).

Two backward passes, one forward (gather the rows in the table's dtype, then cast):

* ``grad="scatter"``: autodiff of that gather, a scatter-add in the table's dtype (float32).
* ``grad="onehot"``: dtable = one_hot(ids)^T @ g as matmuls over token chunks of
  ``chunk`` (float32 accumulation, no atomics, deterministic): the tensor cores do the sum.
  The (chunk, V) one-hot is the only extra buffer.

Both give the same gradient up to float32 summation order (tests/test_embedding.py).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

EMBED_GRADS = ("scatter", "onehot")


def embed_lookup(table: jax.Array, ids: jax.Array, dtype, *, grad: str = "scatter",
                 chunk: int = 4096) -> jax.Array:
    """table (V, D), ids (...) int -> (..., D) in ``dtype``. See the module docstring."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"embed_lookup: ids must be integers, got {ids.dtype}")
    if grad == "scatter":
        return jnp.take(table, ids, axis=0).astype(dtype)
    if grad == "onehot":
        return _onehot_lookup(table, ids, int(chunk), jnp.dtype(dtype))
    raise ValueError(f"embed_lookup: grad={grad!r}, expected one of {EMBED_GRADS}")


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onehot_lookup(table, ids, chunk, dtype):
    return jnp.take(table, ids, axis=0).astype(dtype)


def _onehot_fwd(table, ids, chunk, dtype):
    # the table itself is not needed by the backward, only its shape and dtype: keep a
    # zero-size stand-in so that no (V, D) residual is held. The cast is inside, so the
    # cotangent arrives in the compute dtype and the one-hot products run at its speed.
    out = jnp.take(table, ids, axis=0).astype(dtype)
    return out, (ids, jnp.zeros((0,) + table.shape, table.dtype))


def _onehot_bwd(chunk, dtype, res, g):
    ids, shape_of = res
    V, D = shape_of.shape[1:]
    acc = shape_of.dtype
    ids = ids.reshape(-1)
    g = g.reshape(-1, D)
    n = ids.shape[0]
    c = max(1, min(chunk, n))
    pad = -n % c
    if pad:  # padded tokens get id -1: a one-hot row of zeros
        ids = jnp.pad(ids, (0, pad), constant_values=-1)
        g = jnp.pad(g, ((0, pad), (0, 0)))
    ids = ids.reshape(-1, c)
    g = g.reshape(-1, c, D)

    def add(dt, x):
        i, gi = x
        oh = jax.nn.one_hot(i, V, dtype=gi.dtype)  # (c, V), exact in any float dtype
        return dt + jnp.einsum("cv,cd->vd", oh, gi, preferred_element_type=acc), None

    dt, _ = jax.lax.scan(add, jnp.zeros((V, D), acc), (ids, g))
    return dt, None


_onehot_lookup.defvjp(_onehot_fwd, _onehot_bwd)
