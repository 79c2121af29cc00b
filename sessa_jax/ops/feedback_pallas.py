"""``feedback_impl="pallas"``: the chunked feedback solve with its rectangular products fused
into Pallas kernels.

Same system, same chunk sweep, same custom VJP as ``"chunked"`` (:mod:`sessa_jax.ops.feedback`):
a ``lax.scan`` over chunks of c rows, forward substitution in the forward pass, the transposed
(anti-causal) system in reverse chunk order in the backward pass. What changes is how the heavy
rectangular work of a chunk is done. ``"chunked"`` materialises the chunk's (c, T) score block
in HBM and runs separate XLA ops over it; here each such product is one Pallas kernel that
forms the score tiles in on-chip memory and never writes them out:

* forward, chunk i (rows R = [ic, ic + c)): :func:`_cross_call`, a flash-style (online
  softmax) pass over the key tiles before the chunk, giving the unnormalised
  cross = sum_j exp(score - m) s_j with the running max m and sum l. The chunk's own c x c
  diagonal block (scores, its softmax share, the block inverse) stays in JAX: it is small, and
  merging its max/sum with the kernel's (m, l) gives the rows' exact log-normaliser.
* backward, key chunk i (keys J = [ic, ic + c)), with lse known (no online max):
  :func:`_rhs_call`, a pass over the query-row tiles t >= ic giving W^T df for the chunk
  (W[t, j] = gamma_t alpha[t, j]; rows of the chunk itself still hold df = 0 there), then,
  once df_c is solved (JAX, with the saved block inverse), :func:`_grad_call`, a second pass
  over the same row tiles giving dscore^T = W^T * (s_c df^T - e) -> dk_c (accumulated over the
  row tiles) and each row tile's dq contribution (added in place into the dq carry).

Tiling (TPU, Mosaic). The grid is (batch, tiles of the other side); every tile is a whole
chunk on one side (c rows or c keys) by ``block`` (256) on the other (``_layout``), and spans
the full width D: the score tile q_c k^T needs the whole contraction, and a chunk-by-D tile of
a few MiB fits VMEM (c = 512, D = 768, bf16: 0.75 MiB an operand, 1.5 MiB for the float32
accumulator). The tile axis is a reduction ("arbitrary"): the output block (the chunk's
accumulator) stays resident in VMEM across it. Tiles that the chunk cannot see are skipped
(a tile that reaches across the chunk's edge, when c is not a multiple of the tile, is masked):
their block index is clamped through scalar prefetch (no DMA) and the body is guarded by
``pl.when``, so the forward only reads keys before the chunk and the backward only rows from
the chunk on (the causal half, as ``"chunked"``'s segmented sweep approximates). The VMEM
limit is raised to what the tiles need (``_vmem_limit``); very wide models want a smaller c.

GPU: the same three calls as Triton kernels of another design
(:mod:`sessa_jax.ops.feedback_pallas_gpu`): a TPU tile of c rows by the full width (0.75 MiB an
operand at c = 512, D = 768) does not fit an SM (228 KiB of shared memory), and Triton runs
grid points as independent programs, so there each program owns 16-64 rows (or keys) and all
D columns of its output in registers, and loops over the other side inside the kernel. Which
design runs is chosen per lowering platform (:func:`_by_platform`); ``kernels="gpu"`` runs
the GPU one in interpret mode on CPU, which is how the tests check it.

Meshes: Mosaic kernels cannot be partitioned by XLA, so the Sessa layer always runs this
solve under ``shard_map`` over the batch axes (``spread_rows(..., kernel=True)`` in
:mod:`sessa_jax.models.partitioning`); called directly under ``jit`` with sharded inputs it
fails with "Mosaic kernels cannot be automatically partitioned".

CPU: the same kernels in Pallas's interpret mode (chosen per lowering platform with
``lax.platform_dependent``, so an ahead-of-time TPU compile from a CPU host gets Mosaic).

Segment ids are supported: every tile is masked to the own segment (alpha[t, j] = 0 across
segments), as in ``"chunked"``.

Precision as ``"chunked"``: score products in the input dtype with float32 accumulation
(float64 for float64 inputs, interpret mode only), softmax statistics and accumulators in
float32/64, s in f's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sessa_jax.ops.feedback import (
    RESIDUAL_NAMES, _acc_dtype, _block_inverse, _half, _inner, _solve_chunk, Inverse,
)
from sessa_jax.ops import feedback_pallas_gpu as gpu
from sessa_jax.ops.segments import visible

_NEG = -jnp.inf


def _layout(T: int, c: int, block: int) -> tuple[int, int]:
    """(other-side tile bt, padded length tp): tp is a multiple of c and of bt.

    bt = block where padding T to lcm(c, block) costs at most one block more than padding
    to c (chunks of a power of two), so that bt is a multiple of 128 for a block of 128 or
    256 (Mosaic's lane rule for the (1, bt) row vectors) even for chunks smaller than that;
    one tile of the whole padded length when that is at most ``block``; else the largest of
    block, block/2, ... (>= 8) dividing c, else c.
    """
    tc = -(-T // c) * c
    if tc <= block:
        return tc, tc
    lcm = c * block // math.gcd(c, block)
    tl = -(-T // lcm) * lcm
    if tl - tc <= block:
        return block, tl
    b = min(block, c)
    while b >= 8:
        if c % b == 0:
            return b, tc
        b //= 2
    return c, tc


def _vmem_limit(*tile_bytes: int) -> int:
    # Double-buffered inputs/outputs plus temporaries; at least the 32 MiB most chips allow.
    return int(min(max(32 * 2**20, 3 * sum(tile_bytes)), 100 * 2**20))


def _call(kernel, *, out_shape, grid, in_specs, out_specs, scalars, args, interpret,
          aliases=None, vmem=0, name=None):
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs)
    extra = {}
    if not interpret:
        extra["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=vmem or None)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid_spec=spec, interpret=interpret,
        input_output_aliases=aliases or {}, name=name, **extra,
    )(scalars, *args)


def _by_platform(tpu_fn, gpu_fn, kernels, *args):
    """The kernel for the lowering platform: Mosaic (``tpu_fn``) on TPU, Triton (``gpu_fn``,
    :mod:`sessa_jax.ops.feedback_pallas_gpu`) on CUDA/ROCm, and on CPU one of them in interpret
    mode: the TPU design, or the GPU one with ``kernels="gpu"`` (how the tests check it)."""
    cpu = gpu_fn if kernels == "gpu" else tpu_fn
    branches = dict(cpu=functools.partial(cpu, interpret=True),
                    tpu=functools.partial(tpu_fn, interpret=False))
    if args[0].shape[-1] % 16 == 0 and args[0].shape[-2] % 16 == 0:  # (D, chunk): GPU tiles
        branches["cuda"] = branches["rocm"] = functools.partial(gpu_fn, interpret=False)
    return jax.lax.platform_dependent(*args, **branches)


def _dot_nt(a, b, acc):
    """a (m, d) @ b (n, d)^T with accumulation in acc."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc)


def _dot_tn(a, b, acc):
    """a (k, m)^T @ b (k, n)."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=acc)


def _dot(a, b, acc):
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=acc)


# --------------------------------------------------------------------------------------------
# Forward: unnormalised cross term of one chunk against the keys before it (online softmax)
# --------------------------------------------------------------------------------------------


def _cross_call(q_c, k, s, seg_c, seg_k, start, *, bk, interpret):
    """q_c (B, c, D); k, s (B, tp, D); seg_c (B, c, 1), seg_k (B, 1, tp) int32 or None;
    start: int32 first row of the chunk; keys < start are read (tiles of bk, the last one
    masked where it reaches into the chunk), the chunk's own block is the caller's.
    Returns m (B, c, 1), l (B, c, 1), acc (B, c, D) in the accumulator dtype:
    acc = sum_j exp(score - m) s_j over visible keys, l = sum_j exp(score - m) (m = -inf, l = 0
    and acc = 0 on rows that see nothing)."""
    B, c, D = q_c.shape
    tp = k.shape[1]
    acc_t = _acc_dtype(s.dtype)
    mm = s.dtype
    scale = 1.0 / math.sqrt(D)
    has_seg = seg_c is not None

    def kernel(sc, q_ref, k_ref, s_ref, *rest):
        if has_seg:
            segq_ref, segk_ref, m_ref, l_ref, acc_ref = rest
        else:
            m_ref, l_ref, acc_ref = rest
        kb = pl.program_id(1)

        @pl.when(kb == 0)
        def _():
            m_ref[...] = jnp.full(m_ref.shape, _NEG, acc_t)
            l_ref[...] = jnp.zeros(l_ref.shape, acc_t)
            acc_ref[...] = jnp.zeros(acc_ref.shape, acc_t)

        @pl.when(kb < sc[0])
        def _():
            scores = _dot_nt(q_ref[...], k_ref[...], acc_t) * scale  # (c, bk)
            keys = kb * bk + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
            ok = keys < sc[1]
            if has_seg:
                ok = ok & (segq_ref[...] == segk_ref[...])
            scores = jnp.where(ok, scores, _NEG)
            m_old = m_ref[...]
            m_new = jnp.maximum(m_old, jnp.max(scores, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == _NEG, 0.0, m_new)
            p = jnp.exp(scores - m_safe)
            corr = jnp.exp(m_old - m_safe)
            l_ref[...] = corr * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
            acc_ref[...] = corr * acc_ref[...] + _dot(p.astype(mm), s_ref[...], acc_t)
            m_ref[...] = m_new

    def kidx(b, j, sc):
        return (b, jnp.minimum(j, jnp.maximum(sc[0] - 1, 0)), 0)

    in_specs = [
        pl.BlockSpec((None, c, D), lambda b, j, sc: (b, 0, 0)),
        pl.BlockSpec((None, bk, D), kidx),
        pl.BlockSpec((None, bk, D), kidx),
    ]
    args = [q_c, k, s]
    if has_seg:
        in_specs += [pl.BlockSpec((None, c, 1), lambda b, j, sc: (b, 0, 0)),
                     pl.BlockSpec((None, 1, bk), lambda b, j, sc: (b, 0, kidx(b, j, sc)[1]))]
        args += [seg_c, seg_k]
    row = pl.BlockSpec((None, c, 1), lambda b, j, sc: (b, 0, 0))
    isz = jnp.dtype(mm).itemsize
    return _call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((B, c, 1), acc_t), jax.ShapeDtypeStruct((B, c, 1), acc_t),
                   jax.ShapeDtypeStruct((B, c, D), acc_t)),
        grid=(B, tp // bk), in_specs=in_specs,
        out_specs=(row, row, pl.BlockSpec((None, c, D), lambda b, j, sc: (b, 0, 0))),
        scalars=jnp.stack([(start + bk - 1) // bk, start]).astype(jnp.int32), args=args,
        interpret=interpret,
        vmem=_vmem_limit(c * D * isz, 2 * bk * D * isz, 2 * c * D * 4, 2 * c * bk * 4),
        name="sessa_feedback_cross",
    )


# --------------------------------------------------------------------------------------------
# Backward: W^T df for one key chunk, then dscore -> dk_c and dq (known lse)
# --------------------------------------------------------------------------------------------


def _w_tile(r, sc, k_ref, q_ref, lse_ref, g_ref, seg_refs, *, c, bt, scale, acc_t):
    """W^T tile (c, bt): W[t, j] = gamma_t exp(score[t, j] - lse_t), strictly causal (t > j)
    and inside the segment; rows = the chunk's keys, columns = the tile's query rows. r: the
    grid's tile index (read outside ``pl.when``: interpret mode cannot read it inside)."""
    row0 = (r + sc[0]) * bt  # first query row of the tile
    key0 = sc[1]  # first key of the chunk
    scores = _dot_nt(k_ref[...], q_ref[...], acc_t) * scale
    keys = key0 + jax.lax.broadcasted_iota(jnp.int32, (c, bt), 0)
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (c, bt), 1)
    ok = rows > keys
    if seg_refs:
        ok = ok & (seg_refs[0][...] == seg_refs[1][...])
    return jnp.where(ok, jnp.exp(scores - lse_ref[...]), 0.0) * g_ref[...].astype(acc_t)


def _row_specs(c, D, bt, has_seg, *row_arrays):
    """Specs for (k_c, q, lse, gamma, [seg_c, seg_q]) + extra row-tiled (B, tp, D) arrays."""

    def ridx(b, r, sc):
        return jnp.minimum(r + sc[0], sc[2] - 1)

    specs = [
        pl.BlockSpec((None, c, D), lambda b, r, sc: (b, 0, 0)),
        pl.BlockSpec((None, bt, D), lambda b, r, sc: (b, ridx(b, r, sc), 0)),
        pl.BlockSpec((None, 1, bt), lambda b, r, sc: (b, 0, ridx(b, r, sc))),
        pl.BlockSpec((None, 1, bt), lambda b, r, sc: (b, 0, ridx(b, r, sc))),
    ]
    if has_seg:
        specs += [pl.BlockSpec((None, c, 1), lambda b, r, sc: (b, 0, 0)),
                  pl.BlockSpec((None, 1, bt), lambda b, r, sc: (b, 0, ridx(b, r, sc)))]
    return specs, ridx


def _rhs_call(k_c, q, lse, g, df, seg_c, seg_q, scalars, *, bt, interpret):
    """sum over row tiles t >= first of W^T[chunk, t] df_t: (B, c, D) in the accumulator dtype.
    k_c (B, c, D); q, df (B, tp, D); lse, g (B, 1, tp); seg_c (B, c, 1), seg_q (B, 1, tp) or
    None; scalars int32 [first row tile, first key of the chunk, number of row tiles]."""
    B, c, D = k_c.shape
    tp = q.shape[1]
    acc_t = _acc_dtype(df.dtype)
    mm = df.dtype
    scale = 1.0 / math.sqrt(D)
    has_seg = seg_c is not None
    nseg = 2 if has_seg else 0

    def kernel(sc, k_ref, q_ref, lse_ref, g_ref, *rest):
        seg_refs, (df_ref, out_ref) = rest[:nseg], rest[nseg:]
        r = pl.program_id(1)

        @pl.when(r == 0)
        def _():
            out_ref[...] = jnp.zeros(out_ref.shape, acc_t)

        @pl.when(r + sc[0] < sc[2])
        def _():
            w = _w_tile(r, sc, k_ref, q_ref, lse_ref, g_ref, seg_refs, c=c, bt=bt, scale=scale,
                        acc_t=acc_t)
            out_ref[...] += _dot(w.astype(mm), df_ref[...], acc_t)

    specs, ridx = _row_specs(c, D, bt, has_seg)
    specs.append(pl.BlockSpec((None, bt, D), lambda b, r, sc: (b, ridx(b, r, sc), 0)))
    args = [k_c, q, lse, g] + ([seg_c, seg_q] if has_seg else []) + [df]
    isz = jnp.dtype(mm).itemsize
    return _call(
        kernel, out_shape=jax.ShapeDtypeStruct((B, c, D), acc_t), grid=(B, tp // bt),
        in_specs=specs, out_specs=pl.BlockSpec((None, c, D), lambda b, r, sc: (b, 0, 0)),
        scalars=scalars, args=args, interpret=interpret,
        vmem=_vmem_limit(c * D * isz, 4 * bt * D * isz, c * D * 4, 2 * c * bt * 4),
        name="sessa_feedback_rhs",
    )


def _grad_call(k_c, s_c, q, lse, g, df, e, dq, seg_c, seg_q, scalars, *, bt, interpret):
    """dscore^T = W^T * (s_c df^T - e) over row tiles t >= first; returns dk_c (B, c, D)
    = dscore^T q / sqrt(D) and dq (B, tp, D) with dscore k_c / sqrt(D) added on those rows
    (in place: dq is aliased to the output). e (B, 1, tp); others as :func:`_rhs_call`."""
    B, c, D = k_c.shape
    tp = q.shape[1]
    acc_t = dq.dtype
    mm = df.dtype
    scale = 1.0 / math.sqrt(D)
    has_seg = seg_c is not None
    nseg = 2 if has_seg else 0

    def kernel(sc, k_ref, q_ref, lse_ref, g_ref, *rest):
        seg_refs = rest[:nseg]
        s_ref, df_ref, e_ref, dq_ref, dk_ref, dq_out = rest[nseg:]
        r = pl.program_id(1)

        @pl.when(r == 0)
        def _():
            dk_ref[...] = jnp.zeros(dk_ref.shape, acc_t)

        @pl.when(r + sc[0] < sc[2])
        def _():
            w = _w_tile(r, sc, k_ref, q_ref, lse_ref, g_ref, seg_refs, c=c, bt=bt, scale=scale,
                        acc_t=acc_t)
            dp = _dot_nt(s_ref[...], df_ref[...], acc_t)  # (c, bt)
            ds = (w * (dp - e_ref[...].astype(acc_t))).astype(mm)
            dk_ref[...] += _dot(ds, q_ref[...], acc_t) * scale
            dq_out[...] = dq_ref[...] + _dot_tn(ds, k_ref[...], acc_t) * scale

    specs, ridx = _row_specs(c, D, bt, has_seg)
    row_tile = pl.BlockSpec((None, bt, D), lambda b, r, sc: (b, ridx(b, r, sc), 0))
    specs += [pl.BlockSpec((None, c, D), lambda b, r, sc: (b, 0, 0)), row_tile,
              pl.BlockSpec((None, 1, bt), lambda b, r, sc: (b, 0, ridx(b, r, sc))), row_tile]
    args = [k_c, q, lse, g] + ([seg_c, seg_q] if has_seg else []) + [s_c, df, e, dq]
    isz = jnp.dtype(mm).itemsize
    return _call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((B, c, D), acc_t), jax.ShapeDtypeStruct(dq.shape, acc_t)),
        grid=(B, tp // bt), in_specs=specs,
        out_specs=(pl.BlockSpec((None, c, D), lambda b, r, sc: (b, 0, 0)), row_tile),
        scalars=scalars, args=args, interpret=interpret, aliases={len(args): 1},
        vmem=_vmem_limit(2 * c * D * isz, 4 * bt * D * isz, c * D * 4, 4 * bt * D * 4,
                         3 * c * bt * 4),
        name="sessa_feedback_grad",
    )


# --------------------------------------------------------------------------------------------
# The sweep (custom VJP), as "chunked" with the rectangular products above
# --------------------------------------------------------------------------------------------


def feedback_pallas(q_b, k_b, gamma, f, *, chunk_size: int = 256, inverse: Inverse = "blocked",
                    segment_ids=None, keep_inverses: bool = True, block: int = 256,
                    kernels: str | None = None):
    """Chunked solve with Pallas kernels for the rectangular products. Shapes as
    :func:`sessa_jax.ops.feedback.feedback_solve`; ``block`` is the TPU kernels' other-side
    tile (key tiles in the forward, query-row tiles in the backward), the largest of block,
    block/2, ... that goes with the chunk (see ``_layout``). For the GPU kernels the chunk is
    rounded up to a multiple of 16 (their smallest tile). ``kernels``: None picks the design by
    lowering platform; "gpu" runs the GPU (Triton) design in interpret mode on CPU."""
    if kernels not in (None, "tpu", "gpu"):
        raise ValueError(f"feedback_pallas kernels={kernels!r}: expected None, 'tpu' or 'gpu'")
    gpu_backend = jax.default_backend() in ("gpu", "cuda", "rocm")
    if gpu_backend and f.shape[-1] % 16:
        raise ValueError(
            f"feedback_impl='pallas' on a GPU needs the feedback width D (d_model) to be a "
            f"multiple of 16, got {f.shape[-1]}: use feedback_impl='chunked'")
    if inverse not in ("solve", "doubling", "blocked"):
        raise ValueError(f"feedback inverse={inverse!r}: expected 'solve', 'doubling' or 'blocked'")
    B, T, D = f.shape
    c = max(1, min(int(chunk_size), T))
    if kernels == "gpu" or gpu_backend:  # the GPU kernels' smallest tile
        c = -(-c // 16) * 16
    bt, tp = _layout(T, c, int(block))
    if tp != T:  # zero padding at the end is exact (see feedback_chunked)
        pad3 = ((0, 0), (0, tp - T), (0, 0))
        q_b, k_b, f = (jnp.pad(a, pad3) for a in (q_b, k_b, f))
        gamma = jnp.pad(gamma, ((0, 0), (0, tp - T)))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - T)), constant_values=-1)
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    s = _pallas_solve(q_b, k_b, gamma, f, segment_ids, c, bt, inverse, bool(keep_inverses),
                      kernels)
    return s[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _pallas_solve(q_b, k_b, gamma, f, seg, c, bt, inverse, keep_inv, kernels):
    return _forward(q_b, k_b, gamma, f, seg, c, bt, inverse, keep_inv, kernels)[0]


def _diag_scores(q_c, k_c, seg_c, start, c, scale, acc):
    """The chunk's own c x c scores and their strictly causal, in-segment mask."""
    scores = jnp.einsum("bcd,bed->bce", q_c, k_c, preferred_element_type=acc) * scale
    idx = start + jnp.arange(c)
    return scores, visible(idx, idx, seg_c, seg_c, strict=True)


def _forward(q_b, k_b, gamma, f, seg, c, bt, inverse, keep_inv, kernels):
    B, tp, D = f.shape
    n = tp // c
    acc = _acc_dtype(f.dtype)
    mm = f.dtype
    scale = 1.0 / math.sqrt(D)
    seg_k = None if seg is None else seg[:, None, :]

    def step(carry, i):
        s_buf, ctx, lse, inv = carry
        start = i * c
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)
        q_c, k_c = sl(q_b), sl(k_b)
        f_c, g_c = sl(f).astype(acc), sl(gamma).astype(acc)
        seg_c = None if seg is None else sl(seg)
        m_x, l_x, acc_x = _by_platform(
            functools.partial(_cross_call, bk=bt), gpu.cross_call, kernels, q_c, k_b, s_buf,
            None if seg is None else seg_c[..., None], seg_k, start)
        m_x, l_x = m_x[..., 0], l_x[..., 0]
        sc_cc, mask = _diag_scores(q_c, k_c, seg_c, start, c, scale, acc)
        m = jnp.maximum(m_x, jnp.max(jnp.where(mask, sc_cc, _NEG), axis=-1))
        m = jnp.where(m == _NEG, 0.0, m)
        corr = jnp.exp(m_x - m)
        e_cc = jnp.where(mask, jnp.exp(sc_cc - m[..., None]), 0.0)
        l = corr * l_x + jnp.sum(e_cc, axis=-1)
        l = jnp.where(l > 0, l, 1.0)
        lse_c = m + jnp.log(l)
        cross = acc_x * (corr / l)[..., None]
        a_cc = e_cc / l[..., None]
        return _solve_chunk(carry, i, start, a_cc, cross, f_c, g_c, lse_c, inverse, mm), None

    low = mm if _half(mm) else acc
    carry = (jnp.zeros_like(f), jnp.zeros((B, tp, D), low), jnp.zeros((B, tp), acc),
             jnp.zeros((B, n, c, c), low) if keep_inv else None)
    carry, _ = jax.lax.scan(step, carry, jnp.arange(n, dtype=jnp.int32))
    return carry


def _fwd(q_b, k_b, gamma, f, seg, c, bt, inverse, keep_inv, kernels):
    s, ctx, lse, inv = _forward(q_b, k_b, gamma, f, seg, c, bt, inverse, keep_inv, kernels)
    s, ctx, lse, inv = (None if x is None else checkpoint_name(x, name)
                        for x, name in zip((s, ctx, lse, inv), RESIDUAL_NAMES))
    return s, (q_b, k_b, gamma, seg, s, ctx, lse, inv)


def _bwd(c, bt, inverse, keep_inv, kernels, res, g_s):
    """Reverse sweep over key chunks (the math of ``feedback._chunked_bwd``): per chunk i,
    rhs = G_c + W^T df (kernel, df still 0 on the chunk's rows), df_c = (I - W_cc)^{-T} rhs,
    e_c = df_c . ctx_c = dgamma_c, then dk_c and the dq contributions (kernel)."""
    q_b, k_b, gamma, seg, s, ctx, lse, inv_all = res
    f_dtype = s.dtype
    B, tp, D = s.shape
    acc = _acc_dtype(f_dtype)
    mm = s.dtype
    scale = 1.0 / math.sqrt(D)
    n = tp // c
    nrt = tp // bt
    lse_r = lse[:, None, :]
    g_r = gamma.astype(acc)[:, None, :]
    seg_q = None if seg is None else seg[:, None, :]

    def step(carry, i):
        df, e, dq, dk, dgamma = carry
        start = i * c
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)
        k_c, s_c = sl(k_b), sl(s)
        ctx_c, gs_c = sl(ctx).astype(acc), sl(g_s).astype(acc)
        seg_c = None if seg is None else sl(seg)
        seg_cc = None if seg is None else seg_c[..., None]
        scalars = jnp.stack([start // bt, start, jnp.int32(nrt)]).astype(jnp.int32)
        rhs = gs_c + _by_platform(functools.partial(_rhs_call, bt=bt), gpu.rhs_call, kernels,
                                  k_c, q_b, lse_r, g_r, df, seg_cc, seg_q, scalars)
        if inv_all is not None:
            inv_c = jax.lax.dynamic_index_in_dim(inv_all, i, axis=1, keepdims=False)
        else:
            sc_cc, mask = _diag_scores(sl(q_b), k_c, seg_c, start, c, scale, acc)
            w_cc = jnp.where(mask, jnp.exp(sc_cc - sl(lse)[..., None]), 0.0)
            inv_c = _block_inverse(sl(gamma).astype(acc)[..., None] * w_cc, inverse, mm)
        df_c = _inner("bji,bjd->bid", inv_c, rhs, mm)
        e_c = jnp.sum(df_c * ctx_c, axis=-1)
        df = jax.lax.dynamic_update_slice_in_dim(df, df_c.astype(f_dtype), start, 1)
        e = jax.lax.dynamic_update_slice_in_dim(e, e_c, start, 1)
        dk_c, dq = _by_platform(functools.partial(_grad_call, bt=bt), gpu.grad_call, kernels,
                                k_c, s_c, q_b, lse_r, g_r, df, e[:, None, :], dq, seg_cc, seg_q,
                                scalars)
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_c.astype(k_b.dtype), start, 1)
        dgamma = jax.lax.dynamic_update_slice_in_dim(dgamma, e_c.astype(gamma.dtype), start, 1)
        return (df, e, dq, dk, dgamma), None

    carry = (jnp.zeros((B, tp, D), f_dtype), jnp.zeros((B, tp), acc), jnp.zeros((B, tp, D), acc),
             jnp.zeros((B, tp, D), k_b.dtype), jnp.zeros((B, tp), gamma.dtype))
    (df, _, dq, dk, dgamma), _ = jax.lax.scan(step, carry, jnp.arange(n, dtype=jnp.int32),
                                             reverse=True)
    return dq.astype(q_b.dtype), dk, dgamma, df, None


_pallas_solve.defvjp(_fwd, _bwd)
