"""A decoder language model whose block mixer is chosen by config.

    tokens (B, T) -> Embed -> n_layers x [mixer block (+ SwiGLU MLP block)] -> LayerNorm
                  -> LM head (tied to the embedding or not) -> logits (B, T, V)

``family`` = "sessa" (SessaLayer), "transformer" (AttentionBlock), "mamba" (MambaBlock) or
"mamba2" (Mamba2Block).
Every block has the same inference interface (init_cache / prefill / decode_step), so
generation is family-agnostic (see :mod:`sessa_jax.generate`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sessa_jax.models.attention import AttentionBlock
from sessa_jax.models.config import ModelConfig, to_dtype
from sessa_jax.models.layers import layer_norm, linear, logical
from sessa_jax.models.mamba import MambaBlock
from sessa_jax.models.mamba2 import Mamba2Block
from sessa_jax.models.partitioning import constrain
from sessa_jax.models.sessa import SessaLayer
from sessa_jax.ops.feedback import RESIDUAL_NAMES as FEEDBACK_RESIDUALS

_MIXERS = {"sessa": SessaLayer, "transformer": AttentionBlock, "mamba": MambaBlock,
           "mamba2": Mamba2Block}

_RESIDUAL = ("batch", "length", "act_embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing inside the block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep the feedback solve's residuals (s, ctx, lse, block inverses: O(T*(D+C)) a layer)
    # and recompute the rest of the block: the backward pass never re-runs the solve.
    "save_feedback": jax.checkpoint_policies.save_only_these_names(*FEEDBACK_RESIDUALS),
}


class MLPBlock(nnx.Module):
    """Pre-norm residual SwiGLU: y = x + W_down(SiLU(x' W_gate) * x' W_up), x' = LN(x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, Hm = cfg.d_model, cfg.mlp_hidden
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.ln = layer_norm(D, cfg.ln_eps, **kw)
        self.gate = linear(D, Hm, ("embed", "mlp"), use_bias=False, **kw)
        self.up = linear(D, Hm, ("embed", "mlp"), use_bias=False, **kw)
        self.down = linear(Hm, D, ("mlp", "embed"), use_bias=False, **kw)

    def __call__(self, x):
        u = self.ln(x)
        return x + self.down(jax.nn.silu(self.gate(u)) * self.up(u))


class Block(nnx.Module):
    """One decoder block: the family's mixer block, then an optional MLP block."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.mixer = _MIXERS[cfg.family](cfg.block_config(), rngs=rngs)
        self.mlp = MLPBlock(cfg, rngs=rngs) if cfg.mlp_hidden else None

    def __call__(self, x, segment_ids=None):
        """x (B, T, D), segment_ids (B, T) int or None -> (B, T, D)."""
        x = self.mixer(x, segment_ids)
        return self.mlp(x) if self.mlp is not None else x

    def init_cache(self, batch_size: int, max_len: int):
        return self.mixer.init_cache(batch_size, max_len)

    def prefill(self, x, cache, lengths=None):
        x, cache = self.mixer.prefill(x, cache, lengths)
        return (self.mlp(x) if self.mlp is not None else x), cache

    def decode_step(self, x_t, cache, *, check: bool = True):
        x_t, cache = self.mixer.decode_step(x_t, cache, check=check)
        return (self.mlp(x_t) if self.mlp is not None else x_t), cache


class DecoderLM(nnx.Module):
    """Token embedding -> blocks -> final LayerNorm -> LM head (+ optional class head).

    ``model(tokens)`` -> logits (B, T, V) in float32. ``model.classify(tokens, index)`` ->
    (B, num_classes) class logits read at position ``index`` (B,).

    ``model(tokens, segment_ids=seg)``: packed rows, seg (B, T) int (one id per document, see
    :mod:`sessa_jax.ops.segments`): every family keeps each document to itself (attention and
    the feedback solve within the segment, RoPE positions and the Mamba state restarting at
    its start), so each document's outputs are those of the document run alone.
    Decoding (prefill / decode_step) is one document per row.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        V, D = cfg.vocab_size, cfg.d_model
        self.embed = nnx.Embed(
            V, D, dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype),
            embedding_init=logical(nnx.initializers.normal(0.02), ("vocab", "embed")),
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.ln_f = layer_norm(D, cfg.ln_eps, **kw)
        self.lm_head = (
            None if cfg.tie_embeddings else linear(D, V, ("embed", "vocab"), use_bias=False, **kw)
        )
        self.cls_head = linear(D, cfg.num_classes, ("embed", None), **kw) if cfg.num_classes else None

    # -- training / scoring --------------------------------------------------------------

    def hidden(self, tokens, segment_ids=None):
        """tokens (B, T) int, segment_ids (B, T) int or None -> final hidden states (B, T, D),
        after the final LayerNorm."""
        x = constrain(self.embed(tokens), _RESIDUAL)
        policy = _REMAT_POLICIES.get(self.cfg.remat, "none")
        for block in self.blocks:
            if self.cfg.remat == "none":
                x = block(x, segment_ids)
            else:
                x = nnx.remat(lambda b, h, s: b(h, s), policy=policy)(block, x, segment_ids)
            x = constrain(x, _RESIDUAL)
        return self.ln_f(x)

    def _head(self):
        """The LM head as (weight in the compute dtype, einsum spec): (D, V) or tied (V, D)."""
        dt = to_dtype(self.cfg.dtype)
        if self.lm_head is not None:
            return self.lm_head.kernel[...].astype(dt), "...d,dv->...v"
        return self.embed.embedding[...].astype(dt), "...d,vd->...v"

    def logits(self, h):
        """(..., D) hidden -> (..., V) float32 logits, accumulated in float32 by the product
        itself (not a compute-dtype product cast afterwards)."""
        w, spec = self._head()
        out = _head_logits(spec, h, w)
        if out.ndim == 3:
            out = constrain(out, ("batch", "length", "act_vocab"))
        return out

    def token_nll(self, h, targets, *, predict=False):
        """Per-position cross-entropy without (B, T, V) logits at once.

        h: (B, T, D) hidden (``hidden``'s output); targets: (B, T) int. The sequence is cut
        into chunks of ``cfg.loss_chunk_size`` positions (0: one chunk); each chunk's
        logits are made, reduced and dropped inside a ``lax.scan`` whose body is
        ``jax.checkpoint``-ed, so the backward pass recomputes them chunk by chunk too.
        predict: False, True, or a traced bool (then argmax runs only when it is true).
        Returns nll (B, T) float32 and pred (B, T) int32 (the argmax; -1 where not
        predicted), or None for ``predict=False``.
        """
        w, spec = self._head()
        B, T, _ = h.shape
        c = self.cfg.loss_chunk_size or T
        c = min(c, T)
        want = predict is not False

        def chunk_fn(h_c, t_c, w):
            logits = constrain(_head_logits(spec, h_c, w), ("batch", "length", "act_vocab"))
            lse = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
            nll = lse - picked
            if not want:
                return nll, None
            argmax = lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32)
            if predict is True:
                return nll, argmax(logits)
            pred = jax.lax.cond(
                predict, argmax, lambda x: jnp.full(x.shape[:-1], -1, jnp.int32), logits
            )
            return nll, pred

        if c >= T:
            return chunk_fn(h, targets, w)
        n = -(-T // c)
        if n * c != T:  # pad the tail; padded positions are sliced off
            h = jnp.pad(h, ((0, 0), (0, n * c - T), (0, 0)))
            targets = jnp.pad(targets, ((0, 0), (0, n * c - T)))
        body = jax.checkpoint(chunk_fn)

        def step(_, i):
            h_c = jax.lax.dynamic_slice_in_dim(h, i * c, c, axis=1)
            t_c = jax.lax.dynamic_slice_in_dim(targets, i * c, c, axis=1)
            return None, body(h_c, t_c, w)

        _, (nll, pred) = jax.lax.scan(step, None, jnp.arange(n))
        unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, n * c)[:, :T]  # (n, B, c): small
        return unchunk(nll), (None if pred is None else unchunk(pred))

    def __call__(self, tokens, segment_ids=None):
        """tokens (B, T) int, segment_ids (B, T) int or None -> logits (B, T, V) float32."""
        return self.logits(self.hidden(tokens, segment_ids))

    def classify(self, tokens, index):
        """Class logits (B, num_classes) read at positions ``index`` (B,)."""
        if self.cls_head is None:
            raise ValueError("classify() needs model.num_classes > 0")
        h = self.hidden(tokens)
        h = jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]
        return self.cls_head(h).astype(jnp.float32)

    # -- cached inference ----------------------------------------------------------------

    def init_cache(self, batch_size: int, max_len: int) -> list[Any]:
        """One cache per block; all fixed-size, so decode loops compile once."""
        return [b.init_cache(batch_size, max_len) for b in self.blocks]

    def prefill(self, tokens, cache, lengths: Optional[jax.Array] = None, *,
                last_only: bool = False):
        """Right-padded prompts (B, T) with real lengths (B,) -> (logits, cache).

        logits: (B, T, V); with ``last_only``, (B, V) at each row's last real position
        (``lengths - 1``) only, so the LM head runs on B positions instead of B*T.
        """
        x = self.embed(tokens)
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = block.prefill(x, c, lengths)
            new.append(c)
        if last_only:
            B, T = tokens.shape
            idx = jnp.full((B,), T - 1, jnp.int32) if lengths is None else lengths - 1
            x = jnp.take_along_axis(x, idx[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return self.logits(self.ln_f(x)), new

    def decode_step(self, token, cache, *, check: bool = True):
        """token (B,) int, one per row -> (logits (B, V), cache).

        ``check=False`` skips the per-step cache overflow check (a host callback under jit).
        """
        x = self.embed(token[:, None])
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = block.decode_step(x, c, check=check)
            new.append(c)
        return self.logits(self.ln_f(x))[:, 0], new


def _head_logits(spec, h, w):
    """h (..., D) @ head weight -> float32 logits; operands in the compute dtype, float32
    accumulation (``preferred_element_type``)."""
    if w.dtype == jnp.float64:  # float64 models: as before, a float64 product cast to float32
        return jnp.einsum(spec, h.astype(w.dtype), w).astype(jnp.float32)
    return jnp.einsum(spec, h.astype(w.dtype), w, preferred_element_type=jnp.float32)


def count_params(model: nnx.Module) -> int:
    """Number of parameters (nnx.Param leaves)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
