"""The Sessa feedback solve: s = (I - diag(gamma) alpha)^{-1} f.

    alpha[t, j] = softmax_{j < t}(q_b[t] . k_b[j] / sqrt(D))   (strictly causal; row 0 is zero)
    s_t = f_t + gamma_t * sum_{j<t} alpha[t, j] s_j

With ``segment_ids`` (packed documents, see :mod:`sessa_jax.ops.segments`) the softmax runs
over j < t with seg[j] == seg[t] only: alpha, and so the system, is block diagonal, and the
first token of each document has nothing to read (its alpha row is zero, s_t = f_t).

Two implementations of one function, :func:`feedback_solve`:

* ``"dense"`` materialises the (B, T, T) matrix and calls a unit lower-triangular solve.
  O(T^2) memory. It is the reference every other path is tested against; keep it simple.
* ``"chunked"`` is blocked forward substitution over chunks of C rows with a custom VJP.
  ONE sweep (a ``lax.scan`` over chunks) computes each chunk's scores against its visible
  keys once and gets from them the rows' softmax log-normaliser, the routing weights, the
  contribution of already-solved rows (one rectangular product) and the chunk's C x C
  diagonal block, which it inverts in the step (recursive 2 x 2 blocks, the doubling
  product, or a small triangular solve). The backward pass solves the transposed
  (anti-causal) system in reverse chunk order with the saved block inverses and forms the
  attention gradients in the same sweep. Saved: s, ctx, the log-normaliser and the block
  inverses, O(T * (D + C)) memory (per token: s and ctx in f's dtype for half precision,
  float32/64 otherwise; lse in float32; C inverse entries in f's dtype for half precision,
  or none with ``keep_inverses=False``, which recomputes each in the backward step), each
  tagged with ``checkpoint_name`` (:data:`RESIDUAL_NAMES`) for remat policies.

Precision: score products take the input dtype (bf16 allowed) with float32 accumulation;
softmax statistics, the right-hand-side carries, dgamma and all accumulators are float32
(float64 when the inputs are float64); s is stored in f's dtype. gamma may be float32 while
q_b, k_b, f are bf16; dgamma comes back in gamma's dtype. The in-chunk products (block
inverse times rows) run at full precision for float32/64 inputs and as one bf16 pass with
float32 accumulation for half-precision inputs (see ``_inner``).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.scipy.linalg import solve_triangular

from sessa_jax.ops.segments import visible

Impl = Literal["dense", "chunked", "pallas"]
Inverse = Literal["solve", "doubling", "blocked"]


def _acc_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def feedback_solve(
    q_b, k_b, gamma, f, *, impl: Impl = "chunked", chunk_size: int = 256, segments: int = 8,
    inverse: Inverse = "blocked", unroll: int = 8, segment_ids=None, keep_inverses: bool = True,
):
    """Solve the Sessa feedback system.

    Args:
      q_b, k_b: (B, T, D) feedback queries and keys.
      gamma: (B, T) per-token gain, |gamma| < 1.
      f: (B, T, D) forward-branch output (the right-hand side).
      impl: "dense" (reference, O(T^2) memory), "chunked" (O(T*D) memory, custom VJP) or
        "pallas" ("chunked"'s sweep with Pallas kernels for the rectangular products: Mosaic
        on TPU, Triton on GPU, interpret mode on CPU; see :mod:`sessa_jax.ops.feedback_pallas`).
      chunk_size: rows per block for "chunked"; clipped to T.
      segments: scans the chunk sweep is split into (see :func:`feedback_chunked`).
      inverse: how "chunked" inverts its diagonal blocks: "solve", "doubling" or "blocked".
      unroll: "chunked" sweeps of at most this many chunks run one chunk per step, unrolled.
      segment_ids: optional (B, T) int document ids (not differentiated): alpha[t, j] = 0
        unless seg[j] == seg[t]. None: one document per row.
      keep_inverses: "chunked" keeps its C x C block inverses for the backward pass (2C
        bytes a token in bf16); False recomputes each one there from the diagonal block of
        the scores that the backward step forms anyway (one small inverse a chunk more).
    Returns:
      s: (B, T, D) in f's dtype.
    """
    if impl == "dense":
        return feedback_dense(q_b, k_b, gamma, f, segment_ids)
    if impl == "chunked":
        return feedback_chunked(
            q_b, k_b, gamma, f, chunk_size=chunk_size, segments=segments, inverse=inverse,
            unroll=unroll, segment_ids=segment_ids, keep_inverses=keep_inverses,
        )
    if impl == "pallas":
        # segments/unroll shape "chunked"'s XLA sweep only: the kernels skip invisible tiles.
        from sessa_jax.ops.feedback_pallas import feedback_pallas

        return feedback_pallas(
            q_b, k_b, gamma, f, chunk_size=chunk_size, inverse=inverse,
            segment_ids=segment_ids, keep_inverses=keep_inverses,
        )
    raise ValueError(f"feedback impl={impl!r}: expected 'dense', 'chunked' or 'pallas'")


def feedback_alpha(q_b, k_b, segment_ids=None):
    """Dense strictly-causal routing weights alpha: (B, T, T), row 0 all zero.

    segment_ids (B, T) or None: with ids, alpha[t, j] = 0 across segments and the first row
    of every segment is zero.
    """
    acc = _acc_dtype(q_b.dtype)
    T, D = q_b.shape[1], q_b.shape[2]
    scores = jnp.einsum("btd,bsd->bts", q_b, k_b, preferred_element_type=acc) / math.sqrt(D)
    t = jnp.arange(T)
    mask = visible(t, t, segment_ids, segment_ids, strict=True)
    return _masked_softmax(scores, mask)[0]


def unit_lower_solve(m, b):
    """``solve_triangular(m, b, lower=True, unit_diagonal=True)``; m (..., n, n), b (..., n, k).

    On CPU, jaxlib's batched LAPACK trsm splits the batch over XLA's intra-op thread pool and
    blocks until the pieces finish. With several (virtual) CPU devices running one sharded step,
    each device's solve can hold a pool thread in that wait while the pieces it waits for have
    no thread left: a deadlock (seen with 2 devices on a 2-core host at 8 rows per device). On
    CPU the batch therefore goes through ``lax.map``, one unsplit solve at a time; GPUs and TPUs
    keep the batched solve. The choice is made per lowering platform, so an ahead-of-time TPU
    compile on a CPU host still gets the TPU path.
    """
    def batched(m, b):
        return solve_triangular(m, b, lower=True, unit_diagonal=True)

    if m.ndim == 2:
        return batched(m, b)

    def one_at_a_time(m, b):
        mf = m.reshape((-1,) + m.shape[-2:])
        bf = jnp.broadcast_to(b, m.shape[:-2] + b.shape[-2:]).reshape((-1,) + b.shape[-2:])
        out = jax.lax.map(lambda mb: batched(*mb), (mf, bf))
        return out.reshape(m.shape[:-2] + b.shape[-2:])

    return jax.lax.platform_dependent(m, b, cpu=one_at_a_time, default=batched)


def feedback_dense(q_b, k_b, gamma, f, segment_ids=None):
    """Reference path: materialised alpha and a triangular solve. Shapes as feedback_solve."""
    acc = _acc_dtype(f.dtype)
    T = f.shape[1]
    alpha = feedback_alpha(q_b, k_b, segment_ids)
    m = jnp.eye(T, dtype=acc) - gamma.astype(acc)[..., None] * alpha
    s = unit_lower_solve(m, f.astype(acc))
    return s.astype(f.dtype)


def _masked_exp(scores, mask):
    """Unnormalised masked softmax: (e, l, lse) with alpha = e / l[..., None].

    l is 1 on rows with no valid entry (where e is all zero), so dividing is always safe.
    """
    m = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1)
    # The shift cancels in the softmax: keep it out of autodiff (the dense path is differentiated).
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(mask, jnp.exp(scores - m[..., None]), 0.0)
    l = jnp.sum(e, axis=-1)
    l = jnp.where(l > 0, l, 1.0)
    return e, l, m + jnp.log(l)


def _masked_softmax(scores, mask):
    """Softmax over the last axis where ``mask``; rows with no valid entry give zeros.

    Returns (alpha, lse); lse is 0 on empty rows (never used there: alpha is 0).
    """
    e, l, lse = _masked_exp(scores, mask)
    return e / l[..., None], lse


# --------------------------------------------------------------------------------------------
# Chunked path
# --------------------------------------------------------------------------------------------

# Names of the solve's residuals (jax.ad_checkpoint.checkpoint_name). A remat policy that saves
# these (models/lm.py, remat="save_feedback") keeps the solve out of the backward recompute.
RESIDUAL_NAMES = ("feedback_s", "feedback_ctx", "feedback_lse", "feedback_inv")


def feedback_chunked(
    q_b, k_b, gamma, f, *, chunk_size: int = 256, segments: int = 8,
    inverse: Inverse = "blocked", unroll: int = 8, segment_ids=None, keep_inverses: bool = True,
):
    """Blocked O(T*D)-memory solve with a custom VJP. Shapes as :func:`feedback_solve`.

    ``segments`` splits the chunk sweep into that many scans, each reading only the keys its
    rows can see (a static prefix), so the causal half of the score matrix is mostly skipped:
    work is (1 + 1/segments)/2 of the full rectangle instead of all of it (8: 56%).
    ``inverse`` picks how each C x C diagonal block is inverted inside the sweep: "solve" (a
    unit lower-triangular solve against I), "doubling" ((I+N)(I+N^2)(I+N^4)..., matmuls only)
    or "blocked" (recursive 2 x 2 blocks over 64 x 64 doubling, matmuls only, ~c^3/3 work).
    A sweep of at most ``unroll`` chunks gets one segment per chunk instead: one-trip loops,
    which XLA inlines, so the sweep is unrolled, slices are static and causal skipping is
    exact per chunk. Larger sweeps keep the loops, so that compile time, HLO size and
    temporaries stay flat in T: inlined steps keep more buffers alive (H200, one layer at
    T=32768, c=2048, 16 chunks unrolled: 7.0 GiB peak; c=512 looped: 1.7 GiB).
    ``segment_ids`` (B, T) int or None: the same tiles, masked to the own segment as well.
    ``keep_inverses=False``: the block inverses are not saved for the backward pass (no
    ``feedback_inv`` residual) but recomputed there, one per chunk.
    """
    B, T, D = f.shape
    c = max(1, min(int(chunk_size), T))
    tp = -(-T // c) * c
    if tp != T:
        # Zero-padding at the end is exact: causality means pads never reach real rows, and
        # gamma = 0, f = 0 on pads keeps their own rows (and gradients) zero, whatever segment
        # id the pads get.
        pad3 = ((0, 0), (0, tp - T), (0, 0))
        q_b, k_b, f = (jnp.pad(a, pad3) for a in (q_b, k_b, f))
        gamma = jnp.pad(gamma, ((0, 0), (0, tp - T)))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - T)), constant_values=-1)
    if inverse not in ("solve", "doubling", "blocked"):
        raise ValueError(
            f"feedback inverse={inverse!r}: expected 'solve', 'doubling' or 'blocked'"
        )
    n = tp // c
    if n <= int(unroll):
        nseg = n
    else:
        # At least two chunks a segment: XLA inlines one-trip loops, and the inlined steps
        # kept ~3x the temp memory on CPU (jax 0.10.2; T=512, c=64, 8 one-step segments).
        nseg = max(1, min(int(segments), n // 2))
    edges = tuple(round(n * i / nseg) for i in range(nseg + 1))  # chunk index boundaries
    s = _chunked_solve(q_b, k_b, gamma, f, segment_ids, c, edges, inverse, bool(keep_inverses))
    return s[:, :T]


# segment_ids is a regular (integer, possibly None) argument, not a nondiff_argnum: it may be
# a tracer (jit, remat), and the backward returns None (a zero cotangent) for it.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _chunked_solve(q_b, k_b, gamma, f, seg, c, edges, inverse, keep_inv):
    return _chunked_forward(q_b, k_b, gamma, f, seg, c, edges, inverse, keep_inv)[0]


def _half(dtype) -> bool:
    return jnp.dtype(dtype).itemsize < 4


def _after(x, carry, on: bool = True):
    """(x, carry) through one optimization barrier: nothing computed from the returned x can
    be scheduled before ``carry`` exists. Each segment's prefix/suffix slices are taken from
    it right before the segment's scan (and die after it) instead of all at the start, where
    XLA's scheduler put them (every segment's slices of q_b and k_b live at once, ~3.5 T*D
    each). The scan must take the returned carry: a carry that is also an operand of the
    barrier gets copied (XLA:TPU kept two of each loop buffer). ``on=False``: unchanged (the
    unrolled sweep)."""
    if not on:
        return x, carry
    return jax.lax.optimization_barrier((x, carry))


def _mm32(spec, a, b, precision=jax.lax.Precision.HIGHEST):
    """A small float32/64 product, by default at full precision (no TF32 on GPUs)."""
    return jnp.einsum(spec, a, b, precision=precision)


def _inner(spec, a, b, mm):
    """An in-chunk product (block inverse or diagonal block times a chunk of rows).

    With half-precision inputs the operands are rounded to that dtype and accumulated in
    float32: one bf16 pass instead of six (TPU MXU) or an fp32 GEMM (GPU); s itself is stored
    in that dtype anyway. With float32/64 inputs: full precision, so the float32 tests hold on
    GPUs and TPUs too (CPU computes float32 exactly either way).
    """
    if jnp.dtype(mm).itemsize < 4:
        return jnp.einsum(spec, a.astype(mm), b.astype(mm), preferred_element_type=jnp.float32)
    return _mm32(spec, a, b)


def _doubling_inverse(n_blk, precision=jax.lax.Precision.HIGHEST):
    """(I - N)^{-1} = (I + N)(I + N^2)(I + N^4)... for strictly lower N (..., c, c)."""
    c = n_blk.shape[-1]
    levels = math.ceil(math.log2(c)) if c > 1 else 0
    mm = lambda a, b: _mm32("...ij,...jk->...ik", a, b, precision)
    # x = I + N + ... + N^(2^m - 1), p = N^(2^m): x <- x + x p and p <- p p share the right
    # operand p, so each level is ONE product of [p; x] (2c x c) by p (launches, not FLOPs).
    x = jnp.eye(c, dtype=n_blk.dtype) + n_blk
    if levels < 2:
        return x
    p = mm(n_blk, n_blk)
    for _ in range(levels - 2):
        p, xp = jnp.split(mm(jnp.concatenate([p, x], axis=-2), p), 2, axis=-2)
        x = x + xp
    return x + mm(x, p)


def _diag_blocks(m, size):
    """The diagonal size x size blocks of m (B, c, c): (B, c // size, size, size)."""
    B, c, _ = m.shape
    k = c // size
    blocks = jnp.diagonal(m.reshape(B, k, size, k, size), axis1=1, axis2=3)  # (B, s, s, k)
    return jnp.moveaxis(blocks, -1, 1)


def _blocked_inverse(n_blk, base: int = 64, precision=jax.lax.Precision.HIGHEST):
    """(I - N)^{-1} by recursive 2 x 2 blocks, matmuls only, about c^3 / 3 multiply-adds.

    The base x base diagonal blocks are inverted by doubling (batched); then pairs of
    inverted blocks A^{-1}, D^{-1} with the block C below A are merged,
    [[A, 0], [C, D]]^{-1} = [[A^{-1}, 0], [-D^{-1} C A^{-1}, D^{-1}]], doubling the block
    size each level. c is padded with identity rows to base * 2^k (exact: block diagonal).
    """
    B, c, _ = n_blk.shape
    if c <= base:
        return _doubling_inverse(n_blk, precision)
    cp = base * 2 ** math.ceil(math.log2(c / base))
    m = jnp.eye(c, dtype=n_blk.dtype) - n_blk
    if cp != c:
        m = jnp.pad(m, ((0, 0), (0, cp - c), (0, cp - c)))
        m = m + jnp.diag((jnp.arange(cp) >= c).astype(m.dtype))
    inv = _doubling_inverse(-_diag_blocks(m - jnp.eye(cp, dtype=m.dtype), base), precision)
    size = base
    while size < cp:
        c_blk = _diag_blocks(m, 2 * size)[:, :, size:, :size]  # (B, k, size, size)
        a_inv, d_inv = inv[:, 0::2], inv[:, 1::2]
        low = -_mm32(
            "bkij,bkjl->bkil", d_inv, _mm32("bkij,bkjl->bkil", c_blk, a_inv, precision), precision
        )
        zero = jnp.zeros_like(low)
        inv = jnp.concatenate(
            [jnp.concatenate([a_inv, zero], axis=-1), jnp.concatenate([low, d_inv], axis=-1)],
            axis=-2,
        )
        size *= 2
    return inv[:, 0, :c, :c]


def _block_inverse(n_blk, inverse, mm):
    """(I - N)^{-1} for strictly lower N (B, c, c), in N's (float32/64) dtype.

    The matmul-only variants run at full precision for float32/64 inputs (mm) and at
    Precision.HIGH for half-precision ones (TF32 on GPUs, three bf16 passes on TPUs): the
    inverse is rounded to bf16 in ``_inner`` anyway, and HIGH keeps its error below that.

    "solve": one unit lower-triangular solve against I (cuBLAS trsm on GPUs).
    "doubling": (I + N)(I + N^2)(I + N^4)... with ceil(log2 c) factors (N^c = 0), about
    2 log2(c) c^3 multiply-adds, matmuls only.
    "blocked": recursive 2 x 2 block inversion over doubling-inverted 64 x 64 blocks, about
    c^3 / 3 multiply-adds (c = 512: ~50x fewer than "doubling"), matmuls only.
    """
    if inverse == "solve":
        eye = jnp.eye(n_blk.shape[-1], dtype=n_blk.dtype)
        return unit_lower_solve(eye - n_blk, jnp.broadcast_to(eye, n_blk.shape))
    precision = (jax.lax.Precision.HIGH if jnp.dtype(mm).itemsize < 4
                 else jax.lax.Precision.HIGHEST)
    if inverse == "doubling":
        return _doubling_inverse(n_blk, precision)
    return _blocked_inverse(n_blk, precision=precision)


def _solve_chunk(carry, i, start, a_cc, cross, f_c, g_c, lse_c, inverse, mm):
    """The rest of forward chunk i once its routing weights are known: the diagonal block's
    inverse, s_c, ctx_c, all written into the carry (s_buf, ctx, lse, inv) in place.

    a_cc (B, c, c): the chunk's own block of alpha; cross (B, c, D): sum over earlier chunks
    of alpha s_j; f_c, g_c, lse_c: the chunk's rows of f, gamma and the log-normaliser.
    """
    s_buf, ctx, lse, inv = carry
    inv_c = _block_inverse(g_c[..., None] * a_cc, inverse, mm)
    s_c = _inner("bij,bjd->bid", inv_c, f_c + g_c[..., None] * cross, mm)
    ctx_c = cross + _inner("bij,bjd->bid", a_cc, s_c, mm)
    s_buf = jax.lax.dynamic_update_slice_in_dim(s_buf, s_c.astype(mm), start, 1)
    ctx = jax.lax.dynamic_update_slice_in_dim(ctx, ctx_c.astype(ctx.dtype), start, 1)
    lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_c, start, 1)
    if inv is not None:
        inv = jax.lax.dynamic_update_index_in_dim(inv, inv_c.astype(inv.dtype), i, 1)
    return s_buf, ctx, lse, inv


def _chunked_forward(q_b, k_b, gamma, f, seg, c, edges, inverse, keep_inv=True):
    """Forward substitution, one chunk of c rows per scan step, ONE pass over the scores.

    Step i computes chunk i's scores against every key it can see (< (i+1)c, inside its
    segment's prefix) once, and from them: the rows' log-normaliser lse (no values needed),
    the routing weights alpha, the contribution of already-solved rows (one rectangular
    product), the diagonal block A_cc and its inverse (I - diag(gamma_c) A_cc)^{-1}.
    Segment [a, b) of chunks is one ``lax.scan`` whose rows only see keys < b*c; every output
    is a full-length carry written in place (no stacked (n, B, c, ...) outputs to transpose).
    seg (B, Tp) int or None: with ids, rows see only keys of their own segment (a row with
    no visible key gets alpha = 0, lse = 0).
    Returns s (B, Tp, D) in f's dtype, and residuals ctx (B, Tp, D) (in f's dtype when that
    is half precision, else the accumulator dtype), lse (B, Tp) in the accumulator dtype and
    the inverted diagonal blocks (B, n, c, c) (in f's dtype when that is half precision, else
    the accumulator dtype; None with ``keep_inv=False``).
    """
    B, tp, D = f.shape
    n = tp // c
    acc = _acc_dtype(f.dtype)
    mm = f.dtype  # matmul operand dtype
    scale = 1.0 / math.sqrt(D)
    looped = len(edges) - 1 < n  # segments of several chunks: scans that stay loops

    def make_step(kp, k_all, seg_all, static_start=None):
        """static_start: the chunk's first row when this scan is one chunk (the unrolled
        sweep), so that the cross term can skip the keys of the chunk itself statically."""
        k_seg = k_all[:, :kp]
        cols = jnp.arange(kp)
        seg_cols = None if seg_all is None else seg_all[:, :kp]

        def step(carry, i):
            s_buf, ctx, lse, inv = carry
            start = i * c
            rows = start + jnp.arange(c)
            q_c = jax.lax.dynamic_slice_in_dim(q_b, start, c, axis=1)
            f_c = jax.lax.dynamic_slice_in_dim(f, start, c, axis=1).astype(acc)
            g_c = jax.lax.dynamic_slice_in_dim(gamma, start, c, axis=1).astype(acc)
            scores = jnp.einsum("bcd,btd->bct", q_c, k_seg, preferred_element_type=acc) * scale
            seg_c = None if seg is None else jax.lax.dynamic_slice_in_dim(seg, start, c, axis=1)
            e, l, lse_c = _masked_exp(scores, visible(rows, cols, seg_c, seg_cols, strict=True))
            inv_l = (1.0 / l)[..., None]
            # The product takes e, normalised after it (c x D divisions instead of c x keys):
            # e's cast to the operand dtype does not wait for the row sums, so it can leave in
            # the same pass over the scores as the sums do.
            # Rows >= start are still zero in s_buf, so this sums over earlier chunks only; a
            # static start reads only those (the chunk's own c keys and, for the first chunk,
            # the whole product were multiplications by zero: a c x c x D product a chunk).
            if static_start is None:
                cross = jnp.einsum("bct,btd->bcd", e.astype(mm), s_buf[:, :kp],
                                   preferred_element_type=acc) * inv_l
            elif static_start == 0:
                cross = jnp.zeros((B, c, D), acc)
            else:
                cross = jnp.einsum("bct,btd->bcd", e[..., :static_start].astype(mm),
                                   s_buf[:, :static_start], preferred_element_type=acc) * inv_l
            a_cc = jax.lax.dynamic_slice_in_dim(e, start, c, axis=2) * inv_l
            return _solve_chunk(carry, i, start, a_cc, cross, f_c, g_c, lse_c, inverse, mm), None

        return step

    # The inverses are only ever used through _inner, which rounds them to a half-precision
    # mm anyway: keep them in that dtype then (half the residual bytes, same numbers). ctx
    # enters the backward pass only through row sums with float32 cotangents (delta, dgamma):
    # half precision is enough there too. float32/64 inputs keep everything in acc.
    low = mm if _half(mm) else acc
    carry = (
        jnp.zeros_like(f), jnp.zeros((B, tp, D), low), jnp.zeros((B, tp), acc),
        jnp.zeros((B, n, c, c), low) if keep_inv else None,
    )
    for a, b in zip(edges[:-1], edges[1:]):
        (k_all, seg_all), carry = _after((k_b, seg), carry, looped)
        step = make_step(b * c, k_all, seg_all, a * c if b - a == 1 else None)
        carry, _ = jax.lax.scan(step, carry, jnp.arange(a, b))
    return carry


def _chunked_fwd(q_b, k_b, gamma, f, seg, c, edges, inverse, keep_inv):
    s, ctx, lse, inv = _chunked_forward(q_b, k_b, gamma, f, seg, c, edges, inverse, keep_inv)
    # Named so that a remat policy (save_only_these_names(*RESIDUAL_NAMES)) can keep them.
    # The primal output is the named s itself: the layer's own use of s (after the solve)
    # then needs no recompute either, and s is kept once.
    s, ctx, lse, inv = (
        None if x is None else checkpoint_name(x, name)
        for x, name in zip((s, ctx, lse, inv), RESIDUAL_NAMES)
    )
    return s, (q_b, k_b, gamma, seg, s, ctx, lse, inv)


def _chunked_bwd(c, edges, inverse, keep_inv, res, g_s):
    """Reverse sweep over chunks.

    With M = I - diag(gamma) alpha, W = diag(gamma) alpha (W[t, j] = gamma_t alpha[t, j])
    and G = dL/ds:
      df = M^{-T} G = G + W^T df          (anti-causal, solved chunk by chunk from the end)
      e_t = df_t . ctx_t = dgamma_t
      dscore[t, j] = alpha[t, j] gamma_t (df_t . s_j - e_t) = W[t, j] (df_t . s_j - e_t)
      dq_b = dscore k_b / sqrt(D);  dk_b = dscore^T q_b / sqrt(D)
    (the usual attention backward with dO_t = gamma_t df_t and Delta_t = gamma_t e_t, gamma
    folded into the tile instead of a scaled copy of df).
    Step i handles key/column chunk i: once df is known for rows >= i*c, every row that reads
    chunk i is known, so dk_b for the chunk is final and its dq_b contribution is pushed out.
    Segment [a, b) only touches query rows >= a*c, the rows that can read its keys.
    dk_b and dgamma are full-length carries written in place. With segment ids, the
    forward's mask (own segment, strictly earlier) is applied to every W^T tile.

    Memory: the only full-length float32 (B, T, D) buffer is the dq_b accumulator. G stays
    in its dtype (each chunk's slice is cast). The row-side carries (df, e, dq) hold rows
    >= r0 only and grow at each segment boundary (rows < r0 are still zero there); df is
    the output. Without saved inverses (``keep_inv=False``) each chunk's is recomputed from
    the diagonal block of its W^T tile. For half-precision inputs the W^T tile is kept in
    that dtype (it is rounded to it for the products anyway).
    """
    q_b, k_b, gamma, seg, s, ctx, lse, inv_all = res
    f_dtype = s.dtype  # s is returned in f's dtype
    B, tp, D = s.shape
    acc = _acc_dtype(f_dtype)
    mm = s.dtype  # matmul operand dtype
    scale = 1.0 / math.sqrt(D)
    n = tp // c
    looped = len(edges) - 1 < n

    def make_step(r0, q_seg, lse_seg, g_seg, seg_rows, one_chunk=False):
        """one_chunk: this scan is the single chunk starting at r0 (the unrolled sweep)."""
        rows = r0 + jnp.arange(tp - r0)
        g_cols = g_seg.astype(acc)[:, None, :]  # gamma_t of the tile's columns t >= r0

        def step(carry, i):
            # df, e, dq: rows >= r0 only; dk, dgamma: full length
            (df, e, dq), (dk, dgamma) = carry
            start = i * c
            cols_j = start + jnp.arange(c)
            k_c = jax.lax.dynamic_slice_in_dim(k_b, start, c, axis=1)
            s_c = jax.lax.dynamic_slice_in_dim(s, start, c, axis=1)
            ctx_c = jax.lax.dynamic_slice_in_dim(ctx, start, c, axis=1).astype(acc)
            gs_c = jax.lax.dynamic_slice_in_dim(g_s, start, c, axis=1).astype(acc)
            # W^T block: rows = keys j of this chunk, columns = queries t >= r0.
            scores_t = jnp.einsum("bjd,btd->bjt", k_c, q_seg, preferred_element_type=acc) * scale
            seg_j = None if seg is None else jax.lax.dynamic_slice_in_dim(seg, start, c, axis=1)
            valid = visible(rows, cols_j, seg_rows, seg_j, strict=True, keys_first=True)
            w_t = jnp.where(valid, jnp.exp(scores_t - lse_seg[:, None, :]), 0.0) * g_cols
            local = start - r0
            if inv_all is not None:
                inv_c = jax.lax.dynamic_index_in_dim(inv_all, i, axis=1, keepdims=False)
            else:  # the chunk's own block of W^T is (diag(gamma_c) A_cc)^T
                n_cc = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(w_t, local, c, axis=2), 1, 2)
                inv_c = _block_inverse(n_cc, inverse, mm)
            if _half(mm):
                w_t = w_t.astype(mm)
            # df is zero on rows not yet solved, so this reads later chunks only; with one chunk
            # a scan the chunk's own rows (the first c) are skipped statically, and the last
            # chunk has nothing to read.
            if not one_chunk:
                rhs = gs_c + jnp.einsum("bjt,btd->bjd", w_t.astype(mm), df,
                                        preferred_element_type=acc)
            elif tp - r0 > c:
                rhs = gs_c + jnp.einsum("bjt,btd->bjd", w_t[..., c:].astype(mm), df[:, c:],
                                        preferred_element_type=acc)
            else:
                rhs = gs_c
            df_c = _inner("bji,bjd->bid", inv_c, rhs, mm)  # (I - diag(g) A_cc)^{-T} rhs
            e_c = jnp.sum(df_c * ctx_c, axis=-1)
            df = jax.lax.dynamic_update_slice_in_dim(df, df_c.astype(f_dtype), local, 1)
            e = jax.lax.dynamic_update_slice_in_dim(e, e_c, local, 1)
            dp = jnp.einsum("bjd,btd->bjt", s_c, df, preferred_element_type=acc)
            ds_t = (w_t * (dp - e[:, None, :])).astype(mm)  # dscore^T block
            dk_c = jnp.einsum("bjt,btd->bjd", ds_t, q_seg, preferred_element_type=acc) * scale
            dq = dq + jnp.einsum("bjt,bjd->btd", ds_t, k_c, preferred_element_type=acc) * scale
            dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_c.astype(k_b.dtype), start, 1)
            dgamma = jax.lax.dynamic_update_slice_in_dim(
                dgamma, e_c.astype(gamma.dtype), start, 1
            )
            return ((df, e, dq), (dk, dgamma)), None

        return step

    outs = (jnp.zeros((B, tp, D), k_b.dtype), jnp.zeros((B, tp), gamma.dtype))
    rows_carry = (jnp.zeros((B, 0, D), f_dtype), jnp.zeros((B, 0), acc),
                  jnp.zeros((B, 0, D), acc))
    for a, b in reversed(list(zip(edges[:-1], edges[1:]))):
        r0 = a * c
        # Grow the row-side carries to rows >= r0 (the new rows are still zero), then take
        # this segment's slices of the saved rows, both only once the previous segment is done.
        grow = (tp - r0) - rows_carry[0].shape[1]
        rows_carry = tuple(
            jnp.concatenate([jnp.zeros(x.shape[:1] + (grow,) + x.shape[2:], x.dtype), x], 1)
            for x in rows_carry
        )
        (q_all, lse_all, g_all, seg_all), (rows_carry, outs) = _after(
            (q_b, lse, gamma, seg), (rows_carry, outs), looped)
        seg_rows = None if seg_all is None else seg_all[:, r0:]
        step = make_step(r0, q_all[:, r0:], lse_all[:, r0:], g_all[:, r0:], seg_rows,
                         one_chunk=b - a == 1)
        (rows_carry, outs), _ = jax.lax.scan(
            step, (rows_carry, outs), jnp.arange(a, b), reverse=True
        )
    df, _, dq = rows_carry
    dk, dgamma = outs
    return dq.astype(q_b.dtype), dk, dgamma, df, None


_chunked_solve.defvjp(_chunked_fwd, _chunked_bwd)


# --------------------------------------------------------------------------------------------
# Incremental decoding
# --------------------------------------------------------------------------------------------


def feedback_decode_step(q_t, k_cache, s_cache, gamma_t, f_t, pos):
    """One new token per row against cached feedback keys and past outputs.

    q_t, f_t: (B, D); k_cache, s_cache: (B, L, D); gamma_t: (B,); pos: (B,) the new token's
    position, so slots 0..pos-1 are its past. Returns s_t (B, D); s_t = f_t when pos == 0.
    """
    acc = _acc_dtype(f_t.dtype)
    L, D = k_cache.shape[1], k_cache.shape[2]
    scores = jnp.einsum("bd,bld->bl", q_t, k_cache, preferred_element_type=acc) / math.sqrt(D)
    alpha, _ = _masked_softmax(scores, jnp.arange(L)[None, :] < pos[:, None])
    # Accumulate in float32 inside the product instead of casting the whole (B, L, D) cache.
    ctx = jnp.einsum(
        "bl,bld->bd", alpha.astype(s_cache.dtype), s_cache, preferred_element_type=acc
    )
    return (f_t.astype(acc) + gamma_t.astype(acc)[:, None] * ctx).astype(f_t.dtype)
