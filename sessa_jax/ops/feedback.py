"""The Sessa feedback solve: s = (I - diag(gamma) alpha)^{-1} f.

    alpha[t, j] = softmax_{j < t}(q_b[t] . k_b[j] / sqrt(D))   (strictly causal; row 0 is zero)
    s_t = f_t + gamma_t * sum_{j<t} alpha[t, j] s_j

Two implementations of one function, :func:`feedback_solve`:

* ``"dense"`` materialises the (B, T, T) matrix and calls a unit lower-triangular solve.
  O(T^2) memory. It is the reference every other path is tested against; keep it simple.
* ``"chunked"`` is blocked forward substitution over chunks of C rows with a custom VJP.
  Pass 1 (no dependence on s) computes every row's softmax log-normaliser, every C x C
  diagonal block of alpha, and inverts all the blocks (I - diag(gamma_c) A_cc) in one batched
  triangular solve. Pass 2 is a ``lax.scan`` over chunks that only multiplies: the chunk's
  scores against visible keys (C x T), its routing weights from the known normaliser, the
  contribution of already-solved rows as one rectangular product, and the block inverse.
  The backward pass solves the transposed (anti-causal) system in reverse chunk order with the
  same block inverses and forms the attention gradients in the same sweep. Saved: s, ctx, the
  log-normaliser and the block inverses, O(T * (D + C)) memory.

Precision: matmul operands stay in the input dtype (bf16 allowed); scores, softmax statistics,
the in-chunk solve and all accumulators are float32 (float64 when the inputs are float64).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

Impl = Literal["dense", "chunked"]


def _acc_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def feedback_solve(
    q_b, k_b, gamma, f, *, impl: Impl = "chunked", chunk_size: int = 256, segments: int = 4
):
    """Solve the Sessa feedback system.

    Args:
      q_b, k_b: (B, T, D) feedback queries and keys.
      gamma: (B, T) per-token gain, |gamma| < 1.
      f: (B, T, D) forward-branch output (the right-hand side).
      impl: "dense" (reference, O(T^2) memory) or "chunked" (O(T*D) memory, custom VJP).
      chunk_size: rows per block for "chunked"; clipped to T.
      segments: scans the chunk sweep is split into (see :func:`feedback_chunked`).
    Returns:
      s: (B, T, D) in f's dtype.
    """
    if impl == "dense":
        return feedback_dense(q_b, k_b, gamma, f)
    if impl == "chunked":
        return feedback_chunked(q_b, k_b, gamma, f, chunk_size=chunk_size, segments=segments)
    raise ValueError(f"feedback impl={impl!r}: expected 'dense' or 'chunked'")


def feedback_alpha(q_b, k_b):
    """Dense strictly-causal routing weights alpha: (B, T, T), row 0 all zero."""
    acc = _acc_dtype(q_b.dtype)
    T, D = q_b.shape[1], q_b.shape[2]
    scores = jnp.einsum("btd,bsd->bts", q_b, k_b, preferred_element_type=acc) / math.sqrt(D)
    mask = jnp.tril(jnp.ones((T, T), bool), k=-1)
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


def feedback_dense(q_b, k_b, gamma, f):
    """Reference path: materialised alpha and a triangular solve. Shapes as feedback_solve."""
    acc = _acc_dtype(f.dtype)
    T = f.shape[1]
    alpha = feedback_alpha(q_b, k_b)
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


def feedback_chunked(q_b, k_b, gamma, f, *, chunk_size: int = 256, segments: int = 4):
    """Blocked O(T*D)-memory solve with a custom VJP. Shapes as :func:`feedback_solve`.

    ``segments`` splits the chunk sweep into that many scans, each reading only the keys its
    rows can see (a static prefix), so the causal half of the score matrix is mostly skipped:
    work is (1 + 1/segments)/2 of the full rectangle instead of all of it.
    """
    B, T, D = f.shape
    c = max(1, min(int(chunk_size), T))
    tp = -(-T // c) * c
    if tp != T:
        # Zero-padding at the end is exact: causality means pads never reach real rows, and
        # gamma = 0, f = 0 on pads keeps their own rows (and gradients) zero.
        pad3 = ((0, 0), (0, tp - T), (0, 0))
        q_b, k_b, f = (jnp.pad(a, pad3) for a in (q_b, k_b, f))
        gamma = jnp.pad(gamma, ((0, 0), (0, tp - T)))
    n = tp // c
    nseg = max(1, min(int(segments), n))
    edges = tuple(round(n * i / nseg) for i in range(nseg + 1))  # chunk index boundaries
    s = _chunked_solve(q_b, k_b, gamma, f, c, edges)
    return s[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_solve(q_b, k_b, gamma, f, c, edges):
    return _chunked_forward(q_b, k_b, gamma, f, c, edges)[0]


def _diag_blocks(q_b, k_b, gamma, c, edges):
    """Pass 1 (no dependence on s): row statistics and the inverted diagonal blocks.

    For every chunk: its rows' log-normaliser lse over all visible keys, its diagonal block
    A_cc of alpha, and inv_c = (I - diag(gamma_c) A_cc)^{-1}. The inverses of all chunks come
    from ONE batched triangular solve, so the sequential sweeps need matmuls only (a solve per
    scan step was most of the device time on an H100: small cuBLAS trsm launches).
    Returns lse (B, n, c), a_cc (B, n, c, c), inv (B, n, c, c), all in the accumulator dtype.
    """
    B, tp, D = q_b.shape
    acc = _acc_dtype(q_b.dtype)
    scale = 1.0 / math.sqrt(D)

    def make_step(kp):
        k_seg = k_b[:, :kp]
        cols = jnp.arange(kp)

        def step(_, i):
            start = i * c
            rows = start + jnp.arange(c)
            q_c = jax.lax.dynamic_slice_in_dim(q_b, start, c, axis=1)
            scores = jnp.einsum("bcd,btd->bct", q_c, k_seg, preferred_element_type=acc) * scale
            e, l, lse = _masked_exp(scores, cols[None, :] < rows[:, None])
            a_cc = jax.lax.dynamic_slice_in_dim(e, start, c, axis=2) / l[..., None]
            return None, (lse, a_cc)

        return step

    lses, blocks = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        _, (lse, a_cc) = jax.lax.scan(make_step(b * c), None, jnp.arange(a, b))
        lses.append(lse)
        blocks.append(a_cc)
    lse = jnp.moveaxis(jnp.concatenate(lses), 0, 1)  # (B, n, c)
    a_cc = jnp.moveaxis(jnp.concatenate(blocks), 0, 1)  # (B, n, c, c)
    g = gamma.reshape(B, -1, c).astype(acc)
    m = jnp.eye(c, dtype=acc) - g[..., None] * a_cc
    inv = unit_lower_solve(m, jnp.eye(c, dtype=acc))
    return lse, a_cc, inv


def _mm32(spec, a, b):
    """A small float32/64 product at full precision (no TF32 on GPUs): the in-chunk algebra."""
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def _chunked_forward(q_b, k_b, gamma, f, c, edges):
    """Forward substitution, one chunk of c rows per scan step.

    Segment [a, b) of chunks is one ``lax.scan`` whose rows only see keys < b*c.
    Returns s (B, Tp, D) in f's dtype, and residuals ctx (B, Tp, D), lse (B, Tp) and the
    inverted diagonal blocks (B, n, c, c) in the accumulator dtype.
    """
    B, tp, D = f.shape
    acc = _acc_dtype(f.dtype)
    scale = 1.0 / math.sqrt(D)
    lse_all, a_all, inv_all = _diag_blocks(q_b, k_b, gamma, c, edges)
    lse_flat = lse_all.reshape(B, tp)

    def make_step(kp):
        k_seg = k_b[:, :kp]
        cols = jnp.arange(kp)

        def step(s_buf, i):
            start = i * c
            rows = start + jnp.arange(c)
            q_c = jax.lax.dynamic_slice_in_dim(q_b, start, c, axis=1)
            f_c = jax.lax.dynamic_slice_in_dim(f, start, c, axis=1).astype(acc)
            g_c = jax.lax.dynamic_slice_in_dim(gamma, start, c, axis=1).astype(acc)
            lse_c = jax.lax.dynamic_slice_in_dim(lse_flat, start, c, axis=1)
            scores = jnp.einsum("bcd,btd->bct", q_c, k_seg, preferred_element_type=acc) * scale
            valid = cols[None, :] < rows[:, None]
            alpha = jnp.where(valid, jnp.exp(scores - lse_c[..., None]), 0.0)
            # Rows >= start are still zero in s_buf, so this sums over earlier chunks only.
            cross = jnp.einsum(
                "bct,btd->bcd", alpha.astype(s_buf.dtype), s_buf[:, :kp],
                preferred_element_type=acc,
            )
            a_cc = jax.lax.dynamic_index_in_dim(a_all, i, axis=1, keepdims=False)
            inv_c = jax.lax.dynamic_index_in_dim(inv_all, i, axis=1, keepdims=False)
            s_c = _mm32("bij,bjd->bid", inv_c, f_c + g_c[..., None] * cross)
            ctx_c = cross + _mm32("bij,bjd->bid", a_cc, s_c)
            s_buf = jax.lax.dynamic_update_slice_in_dim(s_buf, s_c.astype(s_buf.dtype), start, 1)
            return s_buf, ctx_c

        return step

    s = jnp.zeros_like(f)
    ctxs = []
    for a, b in zip(edges[:-1], edges[1:]):
        s, ctx = jax.lax.scan(make_step(b * c), s, jnp.arange(a, b))
        ctxs.append(ctx)
    # scan stacks per-chunk outputs as (n, B, c, ...): back to (B, Tp, ...)
    ctx = jnp.moveaxis(jnp.concatenate(ctxs), 0, 1).reshape(B, tp, D)
    return s, ctx, lse_flat, inv_all


def _chunked_fwd(q_b, k_b, gamma, f, c, edges):
    s, ctx, lse, inv = _chunked_forward(q_b, k_b, gamma, f, c, edges)
    return s, (q_b, k_b, gamma, s, ctx, lse, inv)


def _chunked_bwd(c, edges, res, g_s):
    """Reverse sweep over chunks.

    With M = I - diag(gamma) alpha and G = dL/ds:
      df = M^{-T} G                       (anti-causal, solved chunk by chunk from the end)
      dO_t = gamma_t df_t;  Delta_t = dO_t . ctx_t
      dscore[t, j] = alpha[t, j] (dO_t . s_j - Delta_t)
      dq_b = dscore k_b / sqrt(D);  dk_b = dscore^T q_b / sqrt(D);  dgamma_t = df_t . ctx_t
    Step i handles key/column chunk i: once df is known for rows >= i*c, every row that reads
    chunk i is known, so dk_b for the chunk is final and its dq_b contribution is pushed out.
    Segment [a, b) only touches query rows >= a*c, the rows that can read its keys.
    """
    q_b, k_b, gamma, s, ctx, lse, inv_all = res
    f_dtype = s.dtype  # s is returned in f's dtype
    B, tp, D = s.shape
    acc = _acc_dtype(f_dtype)
    mm = s.dtype  # matmul operand dtype
    scale = 1.0 / math.sqrt(D)
    g_s = g_s.astype(acc)

    def make_step(r0):
        q_seg, lse_seg = q_b[:, r0:], lse[:, r0:]
        rows = r0 + jnp.arange(tp - r0)

        def step(carry, i):
            d_o, delta, dq = carry  # (B,Tp-r0,D) mm, (B,Tp-r0) acc, (B,Tp-r0,D) acc
            start = i * c
            cols_j = start + jnp.arange(c)
            k_c = jax.lax.dynamic_slice_in_dim(k_b, start, c, axis=1)
            s_c = jax.lax.dynamic_slice_in_dim(s, start, c, axis=1)
            ctx_c = jax.lax.dynamic_slice_in_dim(ctx, start, c, axis=1)
            g_c = jax.lax.dynamic_slice_in_dim(gamma, start, c, axis=1).astype(acc)
            gs_c = jax.lax.dynamic_slice_in_dim(g_s, start, c, axis=1)
            # alpha^T block: rows = keys j of this chunk, columns = queries t >= r0.
            scores_t = jnp.einsum("bjd,btd->bjt", k_c, q_seg, preferred_element_type=acc) * scale
            valid = rows[None, :] > cols_j[:, None]
            alpha_t = jnp.where(valid, jnp.exp(scores_t - lse_seg[:, None, :]), 0.0)
            # d_o is zero on rows not yet solved, so this reads later chunks only.
            rhs = gs_c + jnp.einsum(
                "bjt,btd->bjd", alpha_t.astype(mm), d_o, preferred_element_type=acc
            )
            local = start - r0
            inv_c = jax.lax.dynamic_index_in_dim(inv_all, i, axis=1, keepdims=False)
            df_c = _mm32("bji,bjd->bid", inv_c, rhs)  # (I - diag(g) A_cc)^{-T} rhs
            do_c = g_c[..., None] * df_c
            d_o = jax.lax.dynamic_update_slice_in_dim(d_o, do_c.astype(mm), local, 1)
            delta = jax.lax.dynamic_update_slice_in_dim(
                delta, jnp.sum(do_c * ctx_c, axis=-1), local, 1
            )
            dp = jnp.einsum("bjd,btd->bjt", s_c, d_o, preferred_element_type=acc)
            ds_t = (alpha_t * (dp - delta[:, None, :])).astype(mm)  # dscore^T block
            dk_c = jnp.einsum("bjt,btd->bjd", ds_t, q_seg, preferred_element_type=acc) * scale
            dq = dq + jnp.einsum("bjt,bjd->btd", ds_t, k_c, preferred_element_type=acc) * scale
            dgamma_c = jnp.sum(df_c * ctx_c, axis=-1)
            return (d_o, delta, dq), (df_c, dk_c, dgamma_c)

        return step

    d_o = jnp.zeros((B, tp, D), mm)
    delta = jnp.zeros((B, tp), acc)
    dq = jnp.zeros((B, tp, D), acc)
    outs = []
    for a, b in reversed(list(zip(edges[:-1], edges[1:]))):
        r0 = a * c
        carry = (d_o[:, r0:], delta[:, r0:], dq[:, r0:])
        (d_o_seg, delta_seg, dq_seg), out = jax.lax.scan(
            make_step(r0), carry, jnp.arange(a, b), reverse=True
        )
        d_o = d_o.at[:, r0:].set(d_o_seg)
        delta = delta.at[:, r0:].set(delta_seg)
        dq = dq.at[:, r0:].set(dq_seg)
        outs.insert(0, out)
    df, dk, dgamma = (jnp.concatenate(parts) for parts in zip(*outs))

    def unchunk(x):  # (n, B, c, ...) -> (B, Tp, ...)
        return jnp.moveaxis(x, 0, 1).reshape((B, tp) + x.shape[3:])

    return (
        dq.astype(q_b.dtype),
        unchunk(dk).astype(k_b.dtype),
        unchunk(dgamma).astype(gamma.dtype),
        unchunk(df).astype(f_dtype),
    )


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
    ctx = jnp.einsum("bl,bld->bd", alpha, s_cache.astype(acc))
    return (f_t.astype(acc) + gamma_t.astype(acc)[:, None] * ctx).astype(f_t.dtype)
