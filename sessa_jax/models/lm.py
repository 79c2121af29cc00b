"""A decoder language model whose block mixer is chosen by config.

    tokens (B, T) -> Embed -> n_layers x [mixer block (+ SwiGLU MLP block)] -> LayerNorm
                  -> LM head (tied to the embedding or not) -> logits (B, T, V)

``family`` = "sessa" (SessaLayer), "transformer" (AttentionBlock) or "mamba" (MambaBlock).
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
from sessa_jax.models.partitioning import constrain
from sessa_jax.models.sessa import SessaLayer

_MIXERS = {"sessa": SessaLayer, "transformer": AttentionBlock, "mamba": MambaBlock}

_RESIDUAL = ("batch", "length", "act_embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing inside the block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
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

    def __call__(self, x):
        x = self.mixer(x)
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

    def hidden(self, tokens):
        """tokens (B, T) int -> final hidden states (B, T, D), after the final LayerNorm."""
        x = constrain(self.embed(tokens), _RESIDUAL)
        policy = _REMAT_POLICIES.get(self.cfg.remat, "none")
        for block in self.blocks:
            if self.cfg.remat == "none":
                x = block(x)
            else:
                x = nnx.remat(lambda b, h: b(h), policy=policy)(block, x)
            x = constrain(x, _RESIDUAL)
        return self.ln_f(x)

    def logits(self, h):
        """(..., D) hidden -> (..., V) float32 logits."""
        if self.lm_head is not None:
            out = self.lm_head(h)
        else:
            out = self.embed.attend(h)
        if out.ndim == 3:
            out = constrain(out, ("batch", "length", "act_vocab"))
        return out.astype(jnp.float32)

    def __call__(self, tokens):
        return self.logits(self.hidden(tokens))

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

    def prefill(self, tokens, cache, lengths: Optional[jax.Array] = None):
        """Right-padded prompts (B, T) with real lengths (B,) -> (logits (B, T, V), cache)."""
        x = self.embed(tokens)
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = block.prefill(x, c, lengths)
            new.append(c)
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


def count_params(model: nnx.Module) -> int:
    """Number of parameters (nnx.Param leaves)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
