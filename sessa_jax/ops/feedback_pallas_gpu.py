"""GPU (Triton) kernels for ``feedback_impl="pallas"``: the chunk sweep's rectangular products.

The sweep, its custom VJP and the chunk's own c x c block are :mod:`sessa_jax.ops.feedback_pallas`'s;
this module gives the GPU versions of its three kernel calls, with the same arguments and
results (:func:`cross_call`, :func:`rhs_call`, :func:`grad_call`), chosen there per lowering
platform.

Why a design of its own. The TPU kernels hold a whole chunk (c rows) by the full width D in
VMEM and reduce over a sequential grid axis. A GPU SM has 228 KiB of shared memory and 64K
registers, and Triton runs grid points as independent programs with power-of-two tiles. So
here every program owns one small tile on its side of the product (bm = 16-64 rows or keys)
and all D columns of its output, as register accumulators of power-of-two widths <= 256
(:func:`pieces`: 3 x 256 for D = 768; 256, 256, 256, 64, 32 for D = 864), and loops over the
other side's tiles inside the kernel (``lax.fori_loop`` with a bound that depends on the
chunk: the causal skip). The score tile's contraction over D runs over the same slices,
unrolled. When bm x D floats would not fit the register budget (:data:`ACC_BUDGET`;
D > 2048), the columns are split over a grid axis of groups and the scores are recomputed
once per group.

Speed (BENCHMARKS.md, H100, 2026-12-08): 2-5.5x slower than "chunked", which stays the GPU
default; this path halves the solve's peak memory. Two knobs for the next measurements, off by
default and not yet timed: :data:`LOOP_TILE` (wider tiles on the looped side: 32 x 64 score
tiles instead of 32 x 32) and :data:`MIN_PROGRAMS` (loops split over programs, partials merged
after, for the grids of B x c / 32 programs that leave most SMs idle at chunk 512).

Per tile pair, in units of one (bm x bn x D) product:

* forward (:func:`cross_call`, chunk rows x keys before the chunk, online softmax): scores + p s =
  2, the minimum; m and l are written by the first column group.
* backward, known lse: :func:`rhs_call` W^T df over row tiles after the chunk (2);
  :func:`grad_call` as two kernels, dk over row tiles (scores, s df^T, ds q = 3) and dq over the
  chunk's key tiles for every row tile from the chunk on (3, written in place into the dq
  carry, aliased). 8 in all against the 5 of a kernel that would share the score tile between
  dk and dq (that needs atomics or a (c, T) buffer); the price of keeping each output owned by
  one program.

Precision as the TPU kernels: products on the input dtype with float32 accumulation (float32
inputs: IEEE float32, no TF32; float64: interpret mode only), softmax statistics in float32.

Constraints: D a multiple of 16 and the chunk a multiple of 16 (``feedback_pallas`` rounds the
chunk up; D is checked there). On CPU these kernels run in Pallas's interpret mode
(``feedback_pallas(..., kernels="gpu")``), which is how the tests check them against "dense".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from sessa_jax.ops.feedback import _acc_dtype

_NEG = -jnp.inf

#: float32 accumulator elements a program may hold (bm x columns): 128 registers a thread at
#: 8 warps.
ACC_BUDGET = 32768
NUM_WARPS = 8
NUM_STAGES = 2
#: rows (or keys) of the tiles a program loops over, the side without accumulators: None for
#: the program's own tile size (what BENCHMARKS.md measured on 2026-12-08), else the largest
#: power of two <= it dividing the chunk (64 gives 32 x 64 score tiles at D = 768; untimed).
LOOP_TILE: int | None = None
#: split the loop of the forward, rhs and dk kernels over this many programs at least
#: (flash-decoding style: partial results merged after the call), for grids of a few dozen
#: programs (B x c / bm at chunk 512); None: no split (what was measured on 2026-12-08).
MIN_PROGRAMS: int | None = None


def _pow2_divisor(n: int, cap: int) -> int:
    b = cap
    while b > 1 and n % b:
        b //= 2
    return b


def pieces(n: int) -> tuple[tuple[int, int], ...]:
    """(offset, width) of power-of-two slices <= 256 covering n (a multiple of 16), widest
    first: 768 -> 3 x 256; 864 -> 256, 256, 256, 64, 32 (no padding of odd widths)."""
    out, off = [], 0
    while off < n:
        w = 256
        while w > n - off:
            w //= 2
        out.append((off, w))
        off += w
    return tuple(out)


def tiles(c: int, D: int, itemsize: int = 2) -> tuple[int, int]:
    """(bm, dg): tile rows (also the key tile) and columns per program (D / dg groups).
    Operands of 4+ bytes get half the rows: their (bm, D) tiles pass through shared memory
    (228 KiB an SM), where float32 tiles of 32 rows at D = 864 did not fit (H100, 12-08)."""
    if D % 16 or c % 16:
        raise ValueError(f"GPU feedback kernels need D and the chunk to be multiples of 16 "
                         f"(D={D}, chunk={c}): use feedback_impl='chunked'")
    bm = _pow2_divisor(c, 64)
    rows_budget = ACC_BUDGET if itemsize <= 2 else ACC_BUDGET // 2
    while bm > 16 and bm * D > rows_budget:
        bm //= 2
    dg = D
    while bm * dg > ACC_BUDGET and dg % 32 == 0:  # halves stay multiples of 16
        dg //= 2
    return bm, dg


def loop_tile(c: int, bm: int) -> int:
    """Tile of the side a program loops over (see :data:`LOOP_TILE`)."""
    return bm if LOOP_TILE is None else _pow2_divisor(c, max(16, int(LOOP_TILE)))


def splits(programs: int, max_steps: int) -> int:
    """How many programs share one loop (see :data:`MIN_PROGRAMS`): 1, or enough to reach
    MIN_PROGRAMS, at most one a loop step."""
    if not MIN_PROGRAMS or programs >= MIN_PROGRAMS:
        return 1
    return max(1, min(-(-int(MIN_PROGRAMS) // programs), max_steps))


def _part(lo, hi, n_split, i):
    """[lo, hi) cut into n_split nearly equal parts (dynamic bounds): the i-th."""
    per = (hi - lo + n_split - 1) // n_split
    a = lo + i * per
    return a, jnp.minimum(hi, a + per)


class _Plan(NamedTuple):
    bm: int  # rows or keys a program owns
    bn: int  # rows or keys of the tiles it loops over
    dg: int  # columns a program owns (D / dg column groups)
    cols: tuple  # pieces(dg)
    n_split: int  # programs sharing one loop
    itemsize: int  # operand bytes


def _plan(B: int, c: int, D: int, tp: int, mm) -> _Plan:
    """The tiles of one kernel call: chunk c, width D, padded length tp, operand dtype mm."""
    itemsize = jnp.dtype(mm).itemsize
    bm, dg = tiles(c, D, itemsize)
    bn = loop_tile(c, bm)
    return _Plan(bm, bn, dg, pieces(dg), splits(B * (c // bm) * (D // dg), tp // bn), itemsize)


def _sum_parts(x, n_split):
    """(n_split, ...) partial sums of split loops -> (...)."""
    return x[0] if n_split == 1 else jnp.sum(x, axis=0)


def _nt(a, b, acc):
    """a (m, k) @ b (n, k)^T."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc)


def _nn(a, b, acc):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=acc)


def _contract(pairs, D, rows, cols, acc):
    """sum over D of a @ b^T for each (a_slicer, b_slicer) pair: a tuple of (rows, cols)
    tiles. A slicer maps (offset, width) to a (rows or cols, width) tile; the loop over the
    static slices of :func:`pieces` is unrolled."""
    accs = [jnp.zeros((rows, cols), acc) for _ in pairs]
    for d0, w in pieces(D):
        accs = [x + _nt(a(d0, w), b(d0, w), acc) for x, (a, b) in zip(accs, pairs)]
    return tuple(accs)


def _call(kernel, *, out_shape, grid, args, interpret, itemsize, aliases=None, name=None):
    extra = {}
    if not interpret:  # no multi-buffered loads for 4-byte operands (shared memory, as tiles)
        extra["compiler_params"] = pltriton.CompilerParams(
            num_warps=NUM_WARPS, num_stages=NUM_STAGES if itemsize <= 2 else 1)
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, interpret=interpret,
                          input_output_aliases=aliases or {}, name=name, **extra)(*args)


def _flat_seg(seg, n):
    """(B, n, 1) or (B, 1, n) segment ids -> (B, n) int32, or None."""
    return None if seg is None else seg.reshape(seg.shape[0], n).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def cross_call(q_c, k, s, seg_c, seg_k, start, *, interpret=False):
    """As ``feedback_pallas._cross_call``: q_c (B, c, D); k, s (B, tp, D); seg_c (B, c, 1),
    seg_k (B, 1, tp) or None; start (int32, a multiple of c): keys < start are read.
    Returns m, l (B, c, 1) and acc (B, c, D) in the accumulator dtype."""
    B, c, D = q_c.shape
    tp = k.shape[1]
    acc_t = _acc_dtype(s.dtype)
    mm = s.dtype
    bm, bn, dg, cols, n_split, itemsize = _plan(B, c, D, tp, mm)
    scale = 1.0 / math.sqrt(D)
    has_seg = seg_c is not None

    def kernel(sc_ref, q_ref, k_ref, s_ref, *rest):
        if has_seg:
            segq_ref, segk_ref, m_ref, l_ref, acc_ref = rest
        else:
            m_ref, l_ref, acc_ref = rest
        b, r, gs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        g, part = gs // n_split, gs % n_split
        start_ = sc_ref[0]
        r0 = pl.multiple_of(r * bm, bm)
        col0 = g * dg
        segq = segq_ref[b, pl.ds(r0, bm)] if has_seg else None

        def step(j, carry):
            m, l, accs = carry
            j0 = pl.multiple_of(j * bn, bn)
            (sco,) = _contract(
                [(lambda d0, w: q_ref[b, pl.ds(r0, bm), pl.ds(d0, w)],
                  lambda d0, w: k_ref[b, pl.ds(j0, bn), pl.ds(d0, w)])], D, bm, bn, acc_t)
            sco = sco * scale
            if has_seg:
                sco = jnp.where(segq[:, None] == segk_ref[b, pl.ds(j0, bn)][None, :], sco, _NEG)
            m_new = jnp.maximum(m, jnp.max(sco, axis=1))
            m_safe = jnp.where(m_new == _NEG, 0.0, m_new)
            p = jnp.exp(sco - m_safe[:, None])
            corr = jnp.exp(m - m_safe)
            l = corr * l + jnp.sum(p, axis=1)
            p = p.astype(mm)
            accs = tuple(
                corr[:, None] * a + _nn(p, s_ref[b, pl.ds(j0, bn), pl.ds(col0 + o, wd)], acc_t)
                for (o, wd), a in zip(cols, accs))
            return m_new, l, accs

        init = (jnp.full((bm,), _NEG, acc_t), jnp.zeros((bm,), acc_t),
                tuple(jnp.zeros((bm, w), acc_t) for _, w in cols))
        lo, hi = _part(0, start_ // bn, n_split, part)  # keys < start only
        m, l, accs = jax.lax.fori_loop(lo, hi, step, init)
        for (o, wd), a in zip(cols, accs):
            acc_ref[part, b, pl.ds(r0, bm), pl.ds(col0 + o, wd)] = a

        @pl.when(g == 0)
        def _():
            m_ref[part, b, pl.ds(r0, bm)] = m
            l_ref[part, b, pl.ds(r0, bm)] = l

    args = [jnp.reshape(start, (1,)).astype(jnp.int32), q_c, k, s]
    if has_seg:
        args += [_flat_seg(seg_c, c), _flat_seg(seg_k, tp)]
    m, l, acc = _call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((n_split, B, c), acc_t),
                   jax.ShapeDtypeStruct((n_split, B, c), acc_t),
                   jax.ShapeDtypeStruct((n_split, B, c, D), acc_t)),
        grid=(B, c // bm, (D // dg) * n_split), args=args, interpret=interpret,
        itemsize=itemsize, name="sessa_feedback_cross_gpu")
    if n_split == 1:
        m, l, acc = m[0], l[0], acc[0]
    else:  # merge the parts' online-softmax states
        m_all = jnp.max(m, axis=0)
        w = jnp.where(m == _NEG, 0.0, jnp.exp(m - jnp.where(m_all == _NEG, 0.0, m_all)))
        m, l, acc = m_all, jnp.sum(w * l, axis=0), jnp.sum(w[..., None] * acc, axis=0)
    return m[..., None], l[..., None], acc


# --------------------------------------------------------------------------------------------
# Backward (known lse)
# --------------------------------------------------------------------------------------------


def _w(scores_t, lse_row, g_row, ok):
    """W^T tile: gamma_t exp(score - lse_t) where ok, else 0 (scores (keys, rows))."""
    return jnp.where(ok, jnp.exp(scores_t - lse_row[None, :]), 0.0) * g_row[None, :]


def rhs_call(k_c, q, lse, g, df, seg_c, seg_q, scalars, *, interpret=False):
    """As ``feedback_pallas._rhs_call``: sum over rows t of W^T[chunk, t] df_t, (B, c, D) in the
    accumulator dtype. k_c (B, c, D); q, df (B, tp, D); lse, g (B, 1, tp); seg_c (B, c, 1),
    seg_q (B, 1, tp) or None; scalars int32 [., start, .]. Rows of the chunk itself are skipped
    (their df is still 0 when this runs)."""
    B, c, D = k_c.shape
    tp = q.shape[1]
    acc_t = _acc_dtype(df.dtype)
    mm = df.dtype
    bm, bn, dg, cols, n_split, itemsize = _plan(B, c, D, tp, mm)
    scale = 1.0 / math.sqrt(D)
    has_seg = seg_c is not None

    def kernel(sc_ref, k_ref, q_ref, lse_ref, g_ref, df_ref, *rest):
        if has_seg:
            segc_ref, segq_ref, out_ref = rest
        else:
            (out_ref,) = rest
        b, jt, gs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        grp, part = gs // n_split, gs % n_split
        start_ = sc_ref[1]
        j0 = pl.multiple_of(jt * bm, bm)  # within the chunk
        col0 = grp * dg
        segk = segc_ref[b, pl.ds(j0, bm)] if has_seg else None

        def step(t, accs):
            t0 = pl.multiple_of(t * bn, bn)
            (sct,) = _contract(
                [(lambda d0, w: k_ref[b, pl.ds(j0, bm), pl.ds(d0, w)],
                  lambda d0, w: q_ref[b, pl.ds(t0, bn), pl.ds(d0, w)])], D, bm, bn, acc_t)
            ok = True
            if has_seg:
                ok = segk[:, None] == segq_ref[b, pl.ds(t0, bn)][None, :]
            w = _w(sct * scale, lse_ref[b, pl.ds(t0, bn)], g_ref[b, pl.ds(t0, bn)].astype(acc_t),
                   ok).astype(mm)
            return tuple(a + _nn(w, df_ref[b, pl.ds(t0, bn), pl.ds(col0 + o, wd)], acc_t)
                         for (o, wd), a in zip(cols, accs))

        lo, hi = _part((start_ + c) // bn, tp // bn, n_split, part)
        accs = jax.lax.fori_loop(lo, hi, step, tuple(jnp.zeros((bm, w), acc_t) for _, w in cols))
        for (o, wd), a in zip(cols, accs):
            out_ref[part, b, pl.ds(j0, bm), pl.ds(col0 + o, wd)] = a

    args = [scalars, k_c, q, lse.reshape(B, tp), g.reshape(B, tp), df]
    if has_seg:
        args += [_flat_seg(seg_c, c), _flat_seg(seg_q, tp)]
    out = _call(kernel, out_shape=jax.ShapeDtypeStruct((n_split, B, c, D), acc_t),
                grid=(B, c // bm, (D // dg) * n_split), args=args, interpret=interpret,
                itemsize=itemsize, name="sessa_feedback_rhs_gpu")
    return _sum_parts(out, n_split)


def grad_call(k_c, s_c, q, lse, g, df, e, dq, seg_c, seg_q, scalars, *, interpret=False):
    """As ``feedback_pallas._grad_call``: dscore^T = W^T * (s_c df^T - e) over the rows from the
    chunk on; returns dk_c (B, c, D) = dscore^T q / sqrt(D) and dq (B, tp, D) with
    dscore k_c / sqrt(D) added (in place). e (B, 1, tp); others as :func:`rhs_call`."""
    B, c, D = k_c.shape
    tp = q.shape[1]
    acc_t = dq.dtype
    mm = df.dtype
    bm, bn, dg, cols, n_split, itemsize = _plan(B, c, D, tp, mm)  # n_split: dk's loops only
    scale = 1.0 / math.sqrt(D)
    has_seg = seg_c is not None
    vec = lambda x: x.reshape(B, tp)
    seg_args = [_flat_seg(seg_c, c), _flat_seg(seg_q, tp)] if has_seg else []

    def pair_tiles(k_ref, s_ref, q_ref, df_ref, b, j0, t0, nk, nr):
        """(scores^T, (s df^T)) tiles (nk keys j0.. of the chunk, nr rows t0..): (nk, nr)."""
        return _contract(
            [(lambda d0, w: k_ref[b, pl.ds(j0, nk), pl.ds(d0, w)],
              lambda d0, w: q_ref[b, pl.ds(t0, nr), pl.ds(d0, w)]),
             (lambda d0, w: s_ref[b, pl.ds(j0, nk), pl.ds(d0, w)],
              lambda d0, w: df_ref[b, pl.ds(t0, nr), pl.ds(d0, w)])], D, nk, nr, acc_t)

    def ds_tile(sct, dpt, lse_ref, g_ref, e_ref, b, j0, t0, nk, nr, start_, segc_ref, segq_ref):
        keys = start_ + j0 + jax.lax.broadcasted_iota(jnp.int32, (nk, nr), 0)
        rows = t0 + jax.lax.broadcasted_iota(jnp.int32, (nk, nr), 1)
        ok = rows > keys
        if has_seg:
            ok = ok & (segc_ref[b, pl.ds(j0, nk)][:, None] == segq_ref[b, pl.ds(t0, nr)][None, :])
        w = _w(sct * scale, lse_ref[b, pl.ds(t0, nr)], g_ref[b, pl.ds(t0, nr)].astype(acc_t), ok)
        return (w * (dpt - e_ref[b, pl.ds(t0, nr)].astype(acc_t)[None, :])).astype(mm)

    # dk: one program per key tile of the chunk, looping over the row tiles from the chunk on.
    def dk_kernel(sc_ref, k_ref, s_ref, q_ref, df_ref, lse_ref, g_ref, e_ref, *rest):
        segc_ref, segq_ref = rest[:2] if has_seg else (None, None)
        dk_ref = rest[-1]
        b, jt, gs = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        grp, part = gs // n_split, gs % n_split
        start_ = sc_ref[1]
        j0 = pl.multiple_of(jt * bm, bm)
        col0 = grp * dg

        def step(t, accs):
            t0 = pl.multiple_of(t * bn, bn)
            sct, dpt = pair_tiles(k_ref, s_ref, q_ref, df_ref, b, j0, t0, bm, bn)
            dst = ds_tile(sct, dpt, lse_ref, g_ref, e_ref, b, j0, t0, bm, bn, start_, segc_ref,
                          segq_ref)
            return tuple(a + _nn(dst, q_ref[b, pl.ds(t0, bn), pl.ds(col0 + o, wd)], acc_t)
                         for (o, wd), a in zip(cols, accs))

        lo, hi = _part(start_ // bn, tp // bn, n_split, part)
        accs = jax.lax.fori_loop(lo, hi, step, tuple(jnp.zeros((bm, w), acc_t) for _, w in cols))
        for (o, wd), a in zip(cols, accs):
            dk_ref[part, b, pl.ds(j0, bm), pl.ds(col0 + o, wd)] = a * scale

    args = [scalars, k_c, s_c, q, df, vec(lse), vec(g), vec(e)] + seg_args
    dk = _call(dk_kernel, out_shape=jax.ShapeDtypeStruct((n_split, B, c, D), acc_t),
               grid=(B, c // bm, (D // dg) * n_split), args=args, interpret=interpret,
               itemsize=itemsize, name="sessa_feedback_dk_gpu")
    dk = _sum_parts(dk, n_split)

    # dq: one program per row tile (from the chunk on), looping over the chunk's key tiles.
    def dq_kernel(sc_ref, k_ref, s_ref, q_ref, df_ref, lse_ref, g_ref, e_ref, *rest):
        segc_ref, segq_ref = rest[:2] if has_seg else (None, None)
        dq_in, dq_out = rest[-2], rest[-1]
        b, r, grp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start_ = sc_ref[1]
        t0 = pl.multiple_of(r * bm, bm)
        col0 = grp * dg

        @pl.when(t0 >= start_)  # rows before the chunk see none of its keys
        def _():
            def step(j, accs):
                j0 = pl.multiple_of(j * bn, bn)
                sct, dpt = pair_tiles(k_ref, s_ref, q_ref, df_ref, b, j0, t0, bn, bm)
                dst = ds_tile(sct, dpt, lse_ref, g_ref, e_ref, b, j0, t0, bn, bm, start_,
                              segc_ref, segq_ref)
                # dq_t += dscore[t, j] k_j: dst is (keys, rows), contract over keys.
                return tuple(
                    a + jax.lax.dot_general(
                        dst, k_ref[b, pl.ds(j0, bn), pl.ds(col0 + o, wd)],
                        (((0,), (0,)), ((), ())), preferred_element_type=acc_t)
                    for (o, wd), a in zip(cols, accs))

            accs = jax.lax.fori_loop(0, c // bn, step,
                                     tuple(jnp.zeros((bm, w), acc_t) for _, w in cols))
            for (o, wd), a in zip(cols, accs):
                sl = pl.ds(col0 + o, wd)
                dq_out[b, pl.ds(t0, bm), sl] = dq_in[b, pl.ds(t0, bm), sl] + a * scale

    args = [scalars, k_c, s_c, q, df, vec(lse), vec(g), vec(e)] + seg_args + [dq]
    dq = _call(dq_kernel, out_shape=jax.ShapeDtypeStruct(dq.shape, acc_t),
               grid=(B, tp // bm, D // dg), args=args, interpret=interpret,
               itemsize=itemsize, aliases={len(args) - 1: 0},
               name="sessa_feedback_dq_gpu")
    return dk, dq
