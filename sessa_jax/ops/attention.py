"""Causal multi-head attention with grouped-query heads.

Full sequences go through ``jax.nn.dot_product_attention`` (cuDNN flash attention on GPUs when
dtypes allow it, XLA elsewhere). Query head h reads key/value head h // (H / Hkv), which is
the grouping that function implements.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def _implementation(dtype, head_dim: int) -> Optional[str]:
    # cuDNN needs half precision and head_dim % 8 == 0 (<= 256); elsewhere let XLA do it.
    if (
        jax.default_backend() == "gpu"
        and dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 256
    ):
        return "cudnn"
    return "xla"


def attention_reference(q, k, v, mask):
    """Plain einsum attention in the inputs' precision (float64 stays float64).

    ``jax.nn.dot_product_attention`` always takes its softmax in float32, which caps parity
    checks near 1e-7; this path is used for float64 inputs. q: (B, T, H, d); k, v:
    (B, S, Hkv, d); mask broadcastable to (B, H, T, S) -> (B, T, H, d).
    """
    B, T, H, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(B, T, hkv, H // hkv, d)
    scores = jnp.einsum("btgrd,bsgd->bgrts", qg, k) / jnp.sqrt(jnp.asarray(d, q.dtype))
    mask = jnp.broadcast_to(mask, (B, H, T, k.shape[1])).reshape(B, hkv, H // hkv, T, -1)
    p = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bgrts,bsgd->btgrd", p, v).reshape(B, T, H, d)


def causal_attention(q, k, v):
    """Causal attention, diagonal included.

    q: (B, T, H, d); k, v: (B, T, Hkv, d) -> (B, T, H, d).
    """
    if q.dtype == jnp.float64:
        T = q.shape[1]
        return attention_reference(q, k, v, jnp.tril(jnp.ones((T, T), bool)))
    impl = _implementation(q.dtype, q.shape[-1])
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def cached_attention(q, k_cache, v_cache, pos):
    """One new query per row against a fixed-size cache.

    q: (B, 1, H, d); k_cache, v_cache: (B, L, Hkv, d); pos: (B,) index of the new token, whose
    key/value are already written at ``pos``. Attends to cache slots 0..pos[b].
    """
    L = k_cache.shape[1]
    valid = jnp.arange(L)[None, :] <= pos[:, None]  # (B, L)
    mask = valid[:, None, None, :]  # (B, 1 head, 1 query, L)
    if q.dtype == jnp.float64:
        return attention_reference(q, k_cache, v_cache, mask)
    return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask, implementation="xla")
