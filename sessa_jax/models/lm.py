"""A decoder language model whose block mixer is chosen by config.

    tokens (B, T) -> Embed -> n_layers x [mixer block (+ SwiGLU MLP block)] -> LayerNorm
                  -> LM head (tied to the embedding or not) -> logits (B, T, V)

``family`` = "sessa" (SessaLayer), "transformer" (AttentionBlock), "mamba" (MambaBlock) or
"mamba2" (Mamba2Block).
Every block has the same inference interface (init_cache / prefill / decode_step), so
generation is family-agnostic (see :mod:`sessa_jax.generate`).

``scan_layers``: the blocks are one Block whose parameters carry a leading ``layers`` axis
(built by ``nnx.vmap``), run by one scan (with ``nnx.remat`` inside, see
:meth:`DecoderLM.scan_blocks`): the step's HLO holds one block body instead of n_layers
copies. Initialised to the same numbers as the unscanned model (see :func:`_stacked_blocks`);
:mod:`sessa_jax.models.layout` converts between the two parameter layouts. Caches of a scanned model are one cache pytree stacked on a leading layers
axis, and prefill/decode_step scan over it; unscanned, a list with one cache per block.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sessa_jax.models.attention import AttentionBlock
from sessa_jax.models.config import ModelConfig, to_dtype
from sessa_jax.models.layers import layer_norm, linear, logical
from sessa_jax.models.mamba import MambaBlock
from sessa_jax.models.mamba2 import Mamba2Block
from sessa_jax.models.partitioning import constrain
from sessa_jax.models.sessa import SessaLayer
from sessa_jax.ops.embedding import embed_lookup
from sessa_jax.ops.feedback import RESIDUAL_NAMES as FEEDBACK_RESIDUALS
from sessa_jax.ops.mixed_einsum import mixed_einsum

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

# The stacked axis of scanned blocks: nnx.vmap at creation puts its logical name first in every
# parameter's spec (rule 'layers' in partitioning.DEFAULT_RULES).
_LAYERS = {nnx.PARTITION_NAME: "layers"}


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
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.ln_f = layer_norm(D, cfg.ln_eps, **kw)
        self.lm_head = (
            None if cfg.tie_embeddings else linear(D, V, ("embed", "vocab"), use_bias=False, **kw)
        )
        self.cls_head = linear(D, cfg.num_classes, ("embed", None), **kw) if cfg.num_classes else None

    # -- training / scoring --------------------------------------------------------------

    def embed_tokens(self, tokens):
        """tokens (...) int -> (..., D) embeddings in the compute dtype. Gathered from the
        parameter-dtype table (not ``self.embed(tokens)``, which gathers from a compute-dtype
        copy and so sums the table's gradient in bfloat16: ops/embedding.py)."""
        return embed_lookup(self.embed.embedding[...], tokens, to_dtype(self.cfg.dtype),
                            grad=self.cfg.embed_grad)

    def hidden(self, tokens, segment_ids=None):
        """tokens (B, T) int, segment_ids (B, T) int or None -> final hidden states (B, T, D),
        after the final LayerNorm."""
        x = constrain(self.embed_tokens(tokens), _RESIDUAL)
        side = () if segment_ids is None else (segment_ids,)
        return self.ln_f(self.blocks_forward(x, *side))

    def blocks_forward(self, x, *side):
        """x (B, T, D) embedded -> (B, T, D) after every block (before the final LayerNorm).

        ``side``: per-token arrays every block reads as extra positional arguments (e.g.
        segment ids (B, T)); a scanned model broadcasts them to each layer, they are not
        scanned over. ``cfg.remat`` wraps each block (``nnx.remat``, inside the scan body).
        """
        def step(block, h, *s):
            return constrain(block(h, *s), _RESIDUAL)

        if self.cfg.remat != "none":
            step = nnx.remat(step, policy=_REMAT_POLICIES[self.cfg.remat])
        if self.cfg.scan_layers:
            x, _ = self.scan_blocks(lambda b, h, _: (step(b, h, *side), None), x)
            return x
        for block in self.blocks:
            x = step(block, x, *side)
        return x

    def scan_blocks(self, fn, carry, xs=None):
        """The stacked blocks of a scanned model as one loop: fn(block, carry, x) ->
        (carry, y) for each layer in order -> (carry, ys).

        xs / ys: pytrees with a leading (n_layers,) axis (e.g. caches) or None. A ``lax.scan``
        over the blocks' state, split here and merged into a Block inside the body, rather than
        ``nnx.scan``: that refuses a module built at another trace level (generation's
        while_loop holds the model), and flax 0.12 hands a scalar parameter back with its
        'layers' name dropped. Blocks hold only parameters, so nothing is lost by not writing
        state back. Arrays fn closes over (side inputs) reach every layer unscanned.
        """
        graphdef, state = nnx.split(self.blocks)

        def body(c, layer):
            st, x = layer
            return fn(nnx.merge(graphdef, st), c, x)

        return jax.lax.scan(body, carry, (state, xs))

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

    def init_cache(self, batch_size: int, max_len: int) -> Any:
        """Fixed-size caches (decode loops compile once): a list with one cache per block, or
        for a scanned model one cache pytree whose leaves have a leading (n_layers,) axis."""
        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            return jax.vmap(lambda st: nnx.merge(graphdef, st).init_cache(batch_size, max_len))(
                state)
        return [b.init_cache(batch_size, max_len) for b in self.blocks]

    def _cached(self, fn, x, cache):
        """x through every block with its cache: fn(block, x, cache) -> (x, cache).
        Scanned: one scan over (blocks, stacked cache), x the carry."""
        if self.cfg.scan_layers:
            return self.scan_blocks(fn, x, cache)
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = fn(block, x, c)
            new.append(c)
        return x, new

    def prefill(self, tokens, cache, lengths: Optional[jax.Array] = None, *,
                last_only: bool = False):
        """Right-padded prompts (B, T) with real lengths (B,) -> (logits, cache).

        logits: (B, T, V); with ``last_only``, (B, V) at each row's last real position
        (``lengths - 1``) only, so the LM head runs on B positions instead of B*T.
        """
        x = self.embed_tokens(tokens)
        x, new = self._cached(lambda b, h, c: b.prefill(h, c, lengths), x, cache)
        if last_only:
            B, T = tokens.shape
            idx = jnp.full((B,), T - 1, jnp.int32) if lengths is None else lengths - 1
            x = jnp.take_along_axis(x, idx[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return self.logits(self.ln_f(x)), new

    def decode_step(self, token, cache, *, check: bool = True):
        """token (B,) int, one per row -> (logits (B, V), cache).

        ``check=False`` skips the per-step cache overflow check (a host callback under jit).
        """
        x = self.embed_tokens(token[:, None])
        x, new = self._cached(lambda b, h, c: b.decode_step(h, c, check=check), x, cache)
        return self.logits(self.ln_f(x))[:, 0], new


def _draws_per_block(cfg: ModelConfig) -> int:
    """How many keys one Block's constructor draws from its rng stream.

    Counted on an abstract build (no parameter is allocated): the stream's count is a NumPy
    array, so its increments stay concrete under ``jax.eval_shape``'s tracing.
    """
    seen = []

    def build():
        r = nnx.Rngs(0)
        r.default.count.set_value(np.zeros((), np.uint32))
        Block(cfg, rngs=r)
        seen.append(int(np.asarray(r.default.count.get_value())))

    jax.eval_shape(build)
    return seen[0]


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """n_layers Blocks as one Block whose parameters have a leading (n_layers,) 'layers' axis.

    The unscanned model builds its blocks one after another from one stream: block i draws
    keys fold_in(key, c0 + i*k + j), j < k (k keys a block). ``nnx.vmap`` gives layer i a
    stream with the same key, counting from c0 + i*k, so both layouts initialise to the same
    numbers; the stream then moves past all n*k draws, as the loop leaves it, for the layers
    after the blocks. (``nnx.split_rngs`` would give each layer a key of its own: equally
    random, but not the unscanned model's numbers.)
    """
    stream = rngs.params  # the stream nnx layers draw init keys from ('params' or 'default')
    k = _draws_per_block(cfg)
    key, c0 = stream.key[...], stream.count[...]
    counts = c0 + k * jnp.arange(cfg.n_layers, dtype=jnp.uint32)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=_LAYERS)
    def make(count):
        r = nnx.Rngs(**{stream.tag: key})
        getattr(r, stream.tag).count[...] = count
        return Block(cfg, rngs=r)

    blocks = make(counts)
    stream.count[...] = c0 + k * cfg.n_layers
    # nnx.vmap names the new axis only where a spec is non-empty: a scalar parameter (Sessa's
    # gamma_bias, spec ()) would keep spec () on its (n_layers,) value. Name it here too, so
    # every stacked spec starts with 'layers'.
    for _, v in nnx.iter_graph(blocks):
        if isinstance(v, nnx.Variable) and v.get_metadata().get("out_sharding") == ():
            v.set_metadata(out_sharding=("layers",))
    return blocks


def _head_logits(spec, h, w):
    """h (..., D) @ head weight -> float32 logits; operands in the compute dtype, float32
    accumulation. In a 16-bit compute dtype the backward's two products also take 16-bit
    operands (:func:`sessa_jax.ops.mixed_einsum.mixed_einsum`: plain autodiff would multiply the
    float32 cotangent of the logits with them, promoting the largest matmuls of a 125M model's
    step to TF32); float32 and float64 models differentiate as usual."""
    if w.dtype == jnp.float64:  # float64 models: as before, a float64 product cast to float32
        return jnp.einsum(spec, h.astype(w.dtype), w).astype(jnp.float32)
    return mixed_einsum(spec, h.astype(w.dtype), w)


def count_params(model: nnx.Module) -> int:
    """Number of parameters (nnx.Param leaves)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
