"""The Sessa layer (SESSA_SPEC.md): attention placed inside a recurrent feedback path.

    u = LayerNorm(x);  a, g = split(u W_in + b_in);  a = GELU(a)
    s = SessaMixer(a);  y = x + (s * g) W_out + b_out

The mixer's forward branch is causal multi-head attention (GQA, RoPE); its feedback branch is a
single full-width strictly-causal attention whose values are the mixer's own outputs,
s = (I - diag(gamma) alpha)^{-1} f, solved by :func:`sessa_jax.ops.feedback.feedback_solve`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sessa_jax.models.attention import CausalSelfAttention, check_capacity, write_rows
from sessa_jax.models.config import SessaConfig, to_dtype
from sessa_jax.models.layers import layer_norm, linear, logical, rms_norm, split_products
from sessa_jax.models.partitioning import constrain, row_spread, spread_rows
from sessa_jax.ops.attention import causal_attention
from sessa_jax.ops.feedback import feedback_decode_step, feedback_solve
from sessa_jax.ops.segments import segment_positions


# Sessa's activations are split by rows only, never by width: the routing scores contract over
# all of D. A tensor-split f (the forward branch's out_proj output) made XLA's SPMD partitioner
# misplace rows (jax 0.10.2, CPU, data=fsdp=tensor=2; scripts/repro_spmd_feedback.py reduces
# it to two matmuls and a constraint; the solve is not involved). The feedback solve uses the
# tensor axis by rows instead: spread_rows runs it under shard_map with the batch split over
# the 'fb_rows' axes (data, fsdp AND tensor) where the batch divides (else today's path, every
# tensor rank solving its (data, fsdp) rows); tests/test_models.py checks constrained ==
# unconstrained logits and gradients for tensor = 2 and 4.
_ROWS = ("batch", "length", None)


@struct.dataclass
class SessaCache:
    """Fixed-size decoding state of one Sessa layer (so a whole generation loop jits).

    k, v: (B, L, Hkv, d) forward-branch keys (after RoPE) and values; k_b: (B, L, D) feedback
    keys; s: (B, L, D) past mixer outputs; pos: (B,) int32 tokens consumed per row.
    """

    k: jax.Array
    v: jax.Array
    k_b: jax.Array
    s: jax.Array
    pos: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[1]


class SessaMixer(CausalSelfAttention):
    """Forward attention branch + feedback solve. Input and output (B, T, D).

    Subclasses the shared attention module so the forward branch's parameters sit at the
    mixer's top level (q_proj, k_proj, v_proj, out_proj), as in the reference.
    """

    def __init__(self, cfg: SessaConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg.attention(), rngs=rngs)
        self.cfg = cfg
        D = cfg.d_model
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.proj_fb = linear(D, 2 * D, ("embed", "fb"), **kw)
        self.gamma_ctx = linear(D, 1, ("embed", None), use_bias=False, **kw)
        self.gamma_bias = nnx.Param(
            logical(nnx.initializers.constant(cfg.gamma_bias_init), ())(
                rngs.params(), (), to_dtype(cfg.param_dtype)
            )
        )
        if cfg.feedback_qk_norm:  # opt-in stabiliser; off, the layer is the reference's
            # Scales start at 1 whatever the key: a private Rngs leaves the shared stream (and
            # so every other parameter's init) exactly as with the norm off.
            nkw = dict(kw, rngs=nnx.Rngs(0))
            self.fb_q_norm = rms_norm(D, cfg.ln_eps, **nkw)
            self.fb_k_norm = rms_norm(D, cfg.ln_eps, **nkw)

    def _feedback_inputs(self, a):
        """a (B, T, D) -> q_b, k_b (B, T, D) in the compute dtype, gamma (B, T) float32, all
        constrained to whole-width rows (also on the spread path: see ``__call__``).

        gamma is computed in float32 (float64 for float64 inputs) whatever the compute dtype:
        bfloat16 has no value between 0.99609375 and 1, so gamma_max = 0.999 would round to 1
        and break the |gamma| < 1 contraction exactly where long memory lives.
        """
        q_b, k_b = split_products(self.proj_fb, a)
        if self.cfg.feedback_qk_norm:
            q_b, k_b = self.fb_q_norm(q_b), self.fb_k_norm(k_b)
        acc = jnp.float64 if a.dtype == jnp.float64 else jnp.float32
        w = self.gamma_ctx.kernel[...].astype(acc)[:, 0]  # (D,)
        z = self.gamma_bias[...].astype(acc) + jnp.einsum("btd,d->bt", a.astype(acc), w)
        gamma = jnp.asarray(self.cfg.gamma_max, acc) * jnp.tanh(z)
        return constrain(q_b, _ROWS), constrain(k_b, _ROWS), constrain(gamma, _ROWS[:2])

    def __call__(self, a, *, segment_ids=None, return_state: bool = False):
        """a: (B, T, D) -> s: (B, T, D). With return_state, also the values a cache holds.

        segment_ids (B, T) int or None: both branches stay inside each segment (the feedback
        system is block diagonal; RoPE restarts per segment).
        """
        f, (k, v) = self.attend(a, segment_ids=segment_ids, return_kv=True)
        # Solve rows spread over the tensor axis too (one dispatch point: row_spread). Its
        # inputs are pinned to whole-width (data, fsdp) rows first, as without the spread, so
        # spread_rows only slices them (its output and the backward: an all-gather over
        # tensor of this shard's rows). Unpinned, XLA:TPU had to pick the projections' output
        # sharding against the (data, fsdp, tensor) row spec itself, and with a large fsdp
        # axis it gathered the *global* batch over fsdp (fsdp=16: (64, T, D) all-gathers and
        # all-reduces, forward and backward): 135 GiB a chip on the 7B pod against 21 GiB
        # without the spread (issue 15; scripts/aot_spread_check.py). Pinning f alone was
        # not enough (q_b, k_b free: 8.7 GiB against 2.1 pinned, fsdp=16, 2 layers).
        spread = row_spread(a.shape[0]) is not None
        f = constrain(f, _ROWS)
        q_b, k_b, gamma = self._feedback_inputs(a)
        cfg = self.cfg
        pallas = cfg.feedback_impl == "pallas"  # Mosaic kernels: always under shard_map
        solve = functools.partial(
            feedback_solve, impl=cfg.feedback_impl, chunk_size=cfg.chunk_size,
            segments=cfg.feedback_segments, inverse=cfg.feedback_inverse,
            unroll=cfg.feedback_unroll,
        )
        # s in the compute dtype; the solve's statistics and carries are float32
        if segment_ids is None:
            s = spread_rows(solve, q_b, k_b, gamma, f, kernel=pallas)
        else:  # the ids are per row too: they travel with their rows
            s = spread_rows(lambda q, k, g, f, seg: solve(q, k, g, f, segment_ids=seg),
                            q_b, k_b, gamma, f, segment_ids, kernel=pallas)
        s = constrain(s, _ROWS) if spread else s
        return (s, (k, v, k_b)) if return_state else s

    def decode_step(self, a_t, cache: SessaCache):
        """a_t: (B, 1, D) at positions cache.pos -> (s_t (B, 1, D), updated cache)."""
        pos = cache.pos
        f, ck, cv = self.attend_cached(a_t, cache.k, cache.v, pos)
        q_b, k_b, gamma = self._feedback_inputs(a_t)
        s = feedback_decode_step(q_b[:, 0], cache.k_b, cache.s, gamma[:, 0], f[:, 0], pos)
        s = s[:, None]
        return s, SessaCache(
            k=ck, v=cv, k_b=write_rows(cache.k_b, k_b, pos), s=write_rows(cache.s, s, pos),
            pos=pos + 1,
        )


class SessaLayer(nnx.Module):
    """Pre-norm residual Sessa block. (B, T, D) -> (B, T, D).

    Decoding: ``cache = layer.init_cache(B, max_len)``; ``y, cache = layer.prefill(x, cache)``;
    then ``y_t, cache = layer.decode_step(x_t, cache)`` with x_t of shape (B, 1, D).
    """

    def __init__(self, cfg: SessaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D = cfg.d_model
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.ln = layer_norm(D, cfg.ln_eps, **kw)
        self.W_in = linear(D, 2 * D, ("embed", "mlp"), **kw)
        self.mixer = SessaMixer(cfg, rngs=rngs)
        self.W_out = linear(D, D, ("mlp", "embed"), **kw)

    def _pre(self, x):
        a, g = split_products(self.W_in, self.ln(x))
        return constrain(jax.nn.gelu(a, approximate=False), _ROWS), constrain(g, _ROWS)

    def __call__(self, x, segment_ids=None):
        """x (B, T, D), segment_ids (B, T) int or None -> (B, T, D)."""
        if self.cfg.layer_remat == "staged":
            return _staged_call(self, x, segment_ids)
        a, g = self._pre(x)
        return x + self.W_out(self.mixer(a, segment_ids=segment_ids) * g)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> SessaCache:
        """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens."""
        cfg = self.cfg
        dt = to_dtype(dtype or cfg.dtype)
        kv = (batch_size, max_len, cfg.kv_heads, cfg.head_dim)
        fb = (batch_size, max_len, cfg.d_model)
        return SessaCache(
            k=jnp.zeros(kv, dt), v=jnp.zeros(kv, dt), k_b=jnp.zeros(fb, dt),
            s=jnp.zeros(fb, dt), pos=jnp.zeros((batch_size,), jnp.int32),
        )

    def prefill(self, x, cache: SessaCache, lengths: Optional[jax.Array] = None):
        """Run a prompt through the layer and fill a fresh cache.

        x: (B, T, D) prompts, right-padded; lengths: (B,) real lengths (default T). Outputs at
        real positions equal the full-sequence layer (causality: pads come after them); pad
        slots in the cache are masked out and overwritten by later decode steps.
        """
        B, T, _ = x.shape
        if T > cache.max_len:
            raise ValueError(f"prompt length {T} exceeds the cache's max_len={cache.max_len}")
        a, g = self._pre(x)
        s, (k, v, k_b) = self.mixer(a, return_state=True)
        y = x + self.W_out(s * g)
        zero = jnp.zeros((B,), jnp.int32)
        pos = jnp.full((B,), T, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        return y, SessaCache(
            k=write_rows(cache.k, k, zero), v=write_rows(cache.v, v, zero),
            k_b=write_rows(cache.k_b, k_b, zero), s=write_rows(cache.s, s, zero), pos=pos,
        )

    def decode_step(self, x_t, cache: SessaCache, *, check: bool = True):
        """x_t: (B, 1, D), one new token per row -> (y_t (B, 1, D), updated cache).

        ``check=False`` skips the overflow check (a host callback under jit) for callers that
        have checked their lengths up front, like :func:`sessa_jax.generate.generate`.
        """
        if check:
            check_capacity(cache.pos, 1, cache.max_len)
        a, g = self._pre(x_t)
        s, cache = self.mixer.decode_step(a, cache)
        return x_t + self.W_out(s * g), cache


def _region(fn):
    """``fn(state, *args)`` as one stage of a staged backward pass.

    Forward: ``fn`` as is, keeping only its inputs. Backward: the inputs and the incoming
    cotangent pass one optimization barrier, so the recompute cannot be hoisted before the
    cotangent exists (as ``jax.checkpoint`` does); then ``fn`` is recomputed and
    differentiated; all of its input cotangents (parameter gradients included) leave
    through a second barrier, so whatever consumes them, the next stage first, waits until
    the whole stage is done and its activations are dead. Without that, XLA:TPU deferred
    the output projection's weight gradient past the solve's backward pass, keeping the
    recomputed W_in output (3072 B a token) alive through it. Inputs after ``state`` that
    are integer arrays or None (segment ids, positions) get no cotangent.
    """

    def differentiable(a):
        return a is not None and jnp.issubdtype(jnp.result_type(a), jnp.inexact)

    @jax.custom_vjp
    def run(state, *args):
        return fn(state, *args)

    def fwd(state, *args):
        return fn(state, *args), (state, args)

    def bwd(res, ct):
        (state, args), ct = jax.lax.optimization_barrier((res, ct))
        diff = tuple(differentiable(a) for a in args)
        fixed = [None if d else a for a, d in zip(args, diff)]

        def f(state, *dargs):
            it = iter(dargs)
            return fn(state, *(next(it) if d else a for a, d in zip(fixed, diff)))

        _, vjp = jax.vjp(f, state, *(a for a, d in zip(args, diff) if d))
        grads = jax.lax.optimization_barrier(vjp(ct))
        it = iter(grads[1:])
        return (grads[0],) + tuple(next(it) if d else None for d in diff)

    run.defvjp(fwd, bwd)
    return run


def _staged_call(layer: SessaLayer, x, segment_ids=None):
    """SessaLayer.__call__ with a staged backward pass (``layer_remat="staged"``).

    The same function, cut into regions (:func:`_region`) that keep nothing but their
    inputs and recompute the rest in their own backward step, which finishes as a unit:

        f               = W_o attention(qkv(pre(x)))  region 1 (input x); qkv(pre(x)) is
                                                      region 1a inside it (input x)
        q_b, k_b, gamma = feedback_inputs(pre(x))     region 2 (input x)
        s               = solve(q_b, k_b, gamma, f)   keeps q_b, k_b, gamma, s, ctx, lse
        y               = x + W_out(s * pre(x)[1])    region 3 (inputs x, s), residual add
                                                      included

    The backward pass runs them in reverse: region 3, the solve, region 2, region 1. While
    the solve's backward runs, the live activations are x, dx, the solve's residuals and its
    own temporaries; while the attention's backward runs, x, dx, df, q, k, v, o and its
    statistics. LayerNorm, W_in, GELU and the projections are recomputed per region
    (matmuls of D x 2D: cheap next to the T^2 parts); the forward attention runs twice.
    The solve recomputes its block inverses instead of keeping them (``keep_inverses``).
    """
    cfg = layer.cfg
    graphdef, state = nnx.split(layer)
    mod = lambda st: nnx.merge(graphdef, st)

    @_region
    def qkv(st, x, positions):
        m = mod(st)
        return m.mixer.qkv(m._pre(x)[0], positions)

    @_region
    def branch(st, x, seg):  # as CausalSelfAttention.attend, with q, k, v from region 1a
        m = mod(st)
        positions = jnp.arange(x.shape[1]) if seg is None else segment_positions(seg)
        q, k, v = qkv(st, x, positions)
        o = causal_attention(q, k, v, impl=m.mixer.acfg.attention_impl, segment_ids=seg)
        return constrain(m.mixer.merge_heads(o), _ROWS), x

    @_region
    def fb_inputs(st, x):
        m = mod(st)
        return m.mixer._feedback_inputs(m._pre(x)[0]) + (x,)

    @_region
    def out(st, x, s):
        m = mod(st)
        return x + m.W_out(s * m._pre(x)[1])

    # x is threaded through the regions (each returns it unchanged): the cotangent of x then
    # accumulates inside each stage's backward (behind its barrier) instead of as partial
    # sums that XLA fuses into one add at the very end, keeping all of them alive.
    f, x1 = branch(state, x, segment_ids)
    q_b, k_b, gamma, x2 = fb_inputs(state, x1)
    solve = functools.partial(
        feedback_solve, impl=cfg.feedback_impl, chunk_size=cfg.chunk_size,
        segments=cfg.feedback_segments, inverse=cfg.feedback_inverse,
        unroll=cfg.feedback_unroll, keep_inverses=False,
    )
    # the same dispatch point as SessaMixer.__call__: rows spread over the tensor axis too
    pallas = cfg.feedback_impl == "pallas"
    if segment_ids is None:
        s = spread_rows(solve, q_b, k_b, gamma, f, kernel=pallas)
    else:
        s = spread_rows(lambda q, k, g, f, seg: solve(q, k, g, f, segment_ids=seg),
                        q_b, k_b, gamma, f, segment_ids, kernel=pallas)
    return out(state, x2, s)
