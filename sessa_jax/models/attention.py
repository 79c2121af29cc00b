"""Causal self-attention with GQA and RoPE: the Transformer baseline's block, and the
projection/cache plumbing that the Sessa mixer's forward branch shares."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sessa_jax.models.config import AttentionConfig, to_dtype
from sessa_jax.models.layers import layer_norm, linear
from sessa_jax.models.partitioning import constrain
from sessa_jax.ops.attention import cached_attention, causal_attention
from sessa_jax.ops.rope import apply_rope
from sessa_jax.ops.segments import segment_positions


@struct.dataclass
class AttentionCache:
    """k, v: (B, L, Hkv, d) keys (after RoPE) and values; pos: (B,) tokens consumed per row."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[1]


def write_rows(buf, x, pos):
    """Write x (B, n, ...) into buf (B, L, ...) at per-row offsets pos (B,)."""
    put = lambda b, v, p: jax.lax.dynamic_update_slice_in_dim(b, v.astype(b.dtype), p, 0)
    return jax.vmap(put)(buf, x, pos)


def check_capacity(pos, n_new: int, max_len: int) -> None:
    """Raise ValueError if writing ``n_new`` tokens at ``pos`` would overflow a cache.

    Checked in Python when ``pos`` is concrete; under ``jit`` a host callback raises the same
    message at run time (the generation loop also checks its static lengths up front).
    """
    msg = "decoding cache overflow: {} + {} tokens exceeds max_len={} (init_cache(max_len=...))"
    if not isinstance(pos, jax.core.Tracer):
        top = int(jnp.max(pos))
        if top + n_new > max_len:
            raise ValueError(msg.format(top, n_new, max_len))
        return

    def _raise(top):
        if int(top) + n_new > max_len:
            raise ValueError(msg.format(int(top), n_new, max_len))

    jax.debug.callback(_raise, jnp.max(pos))


class CausalSelfAttention(nnx.Module):
    """Multi-head causal attention. (B, T, D) -> (B, T, D).

    Parameters q_proj, k_proj, v_proj (with bias) and out_proj (no bias; absent with one head,
    where the reference uses the identity).
    """

    def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
        self.acfg = cfg
        D, H, Hkv, d = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = linear(D, H * d, ("embed", "heads"), **kw)
        self.k_proj = linear(D, Hkv * d, ("embed", "kv"), **kw)
        self.v_proj = linear(D, Hkv * d, ("embed", "kv"), **kw)
        self.out_proj = linear(D, D, ("heads", "embed"), use_bias=False, **kw) if H > 1 else None

    def qkv(self, x, positions):
        """x (B, T, D), positions (B, T) or (T,) -> q (B, T, H, d), k, v (B, T, Hkv, d)."""
        cfg = self.acfg
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, cfg.n_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(B, T, cfg.kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(B, T, cfg.kv_heads, cfg.head_dim)
        if cfg.use_rope:
            q = apply_rope(q, positions, cfg.rope_base)
            k = apply_rope(k, positions, cfg.rope_base)
        heads = ("batch", "length", "act_heads", None)
        return constrain(q, heads), constrain(k, heads), constrain(v, heads)

    def merge_heads(self, o):
        """(B, T, H, d) -> (B, T, D), through out_proj when there is one."""
        B, T = o.shape[:2]
        o = o.reshape(B, T, self.acfg.d_model)
        return self.out_proj(o) if self.out_proj is not None else o

    def attend(self, x, *, segment_ids=None, return_kv: bool = False):
        """Full causal sequence. x (B, T, D) -> (B, T, D) [, (k, v) for a cache].

        segment_ids (B, T) int or None: attention stays inside each segment and RoPE
        positions restart at 0 at every segment start.
        """
        positions = (jnp.arange(x.shape[1]) if segment_ids is None
                     else segment_positions(segment_ids))
        q, k, v = self.qkv(x, positions)
        o = causal_attention(q, k, v, impl=self.acfg.attention_impl, segment_ids=segment_ids)
        o = self.merge_heads(o)
        return (o, (k, v)) if return_kv else o

    def attend_cached(self, x_t, k_cache, v_cache, pos):
        """One token per row at positions pos (B,). x_t (B, 1, D) -> (o (B, 1, D), k, v)."""
        q, k, v = self.qkv(x_t, pos[:, None])
        k_cache = write_rows(k_cache, k, pos)
        v_cache = write_rows(v_cache, v, pos)
        return self.merge_heads(cached_attention(q, k_cache, v_cache, pos)), k_cache, v_cache


class AttentionBlock(nnx.Module):
    """Pre-norm residual attention block: y = x + Attention(LayerNorm(x)). (B, T, D)."""

    def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.ln = layer_norm(cfg.d_model, cfg.ln_eps, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)

    def __call__(self, x, segment_ids=None):
        """x (B, T, D), segment_ids (B, T) int or None -> (B, T, D)."""
        return x + self.attn.attend(self.ln(x), segment_ids=segment_ids)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> AttentionCache:
        cfg = self.cfg
        shape = (batch_size, max_len, cfg.kv_heads, cfg.head_dim)
        dt = to_dtype(dtype or cfg.dtype)
        return AttentionCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                              pos=jnp.zeros((batch_size,), jnp.int32))

    def prefill(self, x, cache: AttentionCache, lengths: Optional[jax.Array] = None):
        """Right-padded prompts x (B, T, D) with real lengths (B,) into a fresh cache."""
        B, T, _ = x.shape
        if T > cache.max_len:
            raise ValueError(f"prompt length {T} exceeds the cache's max_len={cache.max_len}")
        o, (k, v) = self.attn.attend(self.ln(x), return_kv=True)
        zero = jnp.zeros((B,), jnp.int32)
        pos = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        return x + o, AttentionCache(k=write_rows(cache.k, k, zero),
                                     v=write_rows(cache.v, v, zero), pos=pos)

    def decode_step(self, x_t, cache: AttentionCache, *, check: bool = True):
        """x_t (B, 1, D) -> (y_t (B, 1, D), cache). ``check`` as in SessaLayer.decode_step."""
        if check:
            check_capacity(cache.pos, 1, cache.max_len)
        o, k, v = self.attn.attend_cached(self.ln(x_t), cache.k, cache.v, cache.pos)
        return x_t + o, AttentionCache(k=k, v=v, pos=cache.pos + 1)
