"""Causal multi-head attention with grouped-query heads: one entry point, a backend per platform.

:func:`causal_attention` is the only full-sequence attention in the project (the Transformer
baseline and Sessa's forward branch both call it). ``impl`` picks the backend:

* ``"auto"`` (default): chosen for the platform the program is *lowered* for
  (``jax.lax.platform_dependent``), not the process's default backend, so an ahead-of-time TPU
  compile on a CPU host gets the TPU kernel:
    - TPU: Pallas splash attention (:func:`splash_attention`), wrapped in ``shard_map`` over the
      active mesh's batch and head axes (Mosaic kernels are not auto-partitioned);
    - NVIDIA GPU: cuDNN flash attention, when the dtype is bf16/fp16 and the head dim a
      multiple of 8 up to 256;
    - everything else, and any shape those kernels refuse: :func:`blocked_attention`, a pure-JAX
      flash-style attention whose forward and backward memory is O(T * (d + block)).
  Float64 inputs take the exact einsum reference (:func:`attention_reference`).
* ``"splash"``, ``"cudnn"``, ``"blocked"``: that backend (an impossible choice is a
  ``ValueError`` from :func:`check_attention_impl`, called by the model configs).
* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, which materialises the
  (B, H, T, T) float32 logits: a baseline for benchmarks, never the default.

Query head h reads key/value head h // (H / Hkv) in every backend.

``segment_ids`` (B, T) int (packed documents, :mod:`sessa_jax.ops.segments`): query t reads
key j only if j <= t and seg[j] == seg[t]. Every backend takes them: blocked and the reference
mask their tiles, splash gets ``SegmentIds``, "xla" a (B, 1, T, T) mask; cuDNN does not (see
:func:`causal_attention`). ``segment_ids=None`` compiles exactly the unsegmented program.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sessa_jax.ops.segments import visible

AttentionImpl = Literal["auto", "splash", "cudnn", "blocked", "xla"]
ATTENTION_IMPLS = ("auto", "splash", "cudnn", "blocked", "xla")

BLOCK = 512  # query/key block of the blocked and splash paths (MaxText and levanter use 512)


# --------------------------------------------------------------------------------------------
# Choosing a backend
# --------------------------------------------------------------------------------------------


def cudnn_supports(dtype, head_dim: int) -> Optional[str]:
    """None if cuDNN flash attention takes these inputs, else the reason it does not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN attention needs bfloat16 or float16 inputs, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 256:
        return f"cuDNN attention needs a head dim that is a multiple of 8 up to 256, not {head_dim}"
    return None


def check_attention_impl(impl: str, *, head_dim: int, dtype, platform: Optional[str] = None,
                         field: str = "attention_impl") -> None:
    """Raise ``ValueError`` naming ``field`` if ``impl`` cannot run these inputs.

    ``platform`` ("cpu", "gpu", "tpu") is checked when known (a training run knows its devices;
    a model config alone does not).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"{field}={impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    if impl == "cudnn":
        why = cudnn_supports(dtype, head_dim)
        if why:
            raise ValueError(f"{field}='cudnn': {why} (use 'auto' or 'blocked')")
        if platform is not None and platform not in ("gpu", "cuda"):
            raise ValueError(f"{field}='cudnn' needs an NVIDIA GPU; this run is on {platform} "
                             "(use 'auto')")
    if impl == "splash" and platform is not None and platform != "tpu":
        raise ValueError(f"{field}='splash' is a TPU kernel; this run is on {platform} "
                         "(use 'auto': it picks splash on TPU and a flash path elsewhere)")


@functools.cache
def _cuda_present() -> bool:
    """Whether this process has a CUDA backend: cuDNN calls can only be traced where it does."""
    try:
        return any(d.platform in ("gpu", "cuda") for d in jax.devices("gpu"))
    except RuntimeError:
        return False


@functools.cache
def _tpu_possible() -> bool:
    """Whether this process could lower for a TPU: only where libtpu is present (a TPU host, or
    a CPU host compiling ahead of time for a TPU topology). Elsewhere the TPU branch is not
    traced at all, which saves building splash's mask tables on the host (~20 s at T=128k)."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None or jax.default_backend() == "tpu"


def causal_attention(q, k, v, *, impl: str = "auto", segment_ids=None):
    """Causal attention, diagonal included, optionally within segments.

    q: (B, T, H, d); k, v: (B, T, Hkv, d) with H % Hkv == 0 -> (B, T, H, d) in q's dtype.
    segment_ids: optional (B, T) int; query t then reads keys j <= t with seg[j] == seg[t].

    cuDNN with segment ids runs the blocked path instead: jax's cuDNN attention (0.10) takes
    no segment ids, only a dense mask (turned into a (B, 1, T, T) bias whose gradient its
    backward always computes: O(T^2) memory) or a packed-offsets layout with a static
    segment count per row (a private API); neither is a flash path for packed rows.
    """
    if segment_ids is not None:
        return _segmented(q, k, v, segment_ids, impl)
    if q.dtype == jnp.float64 and impl in ("auto", "xla"):
        T = q.shape[1]
        return attention_reference(q, k, v, jnp.tril(jnp.ones((T, T), bool)))
    if impl == "blocked":
        return blocked_attention(q, k, v)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    if impl == "cudnn":
        check_attention_impl(impl, head_dim=q.shape[-1], dtype=q.dtype)
        return _cudnn(q, k, v)
    if impl == "splash":
        # No other branch: lowering this for a non-TPU platform is an error (the training
        # setup rejects the choice earlier, naming the config field).
        return jax.lax.platform_dependent(q, k, v, tpu=splash_attention)
    if impl != "auto":
        check_attention_impl(impl, head_dim=q.shape[-1], dtype=q.dtype)
    branches = {"tpu": splash_attention} if _tpu_possible() else {}
    if cudnn_supports(q.dtype, q.shape[-1]) is None and _cuda_present():
        branches["cuda"] = _cudnn
    return jax.lax.platform_dependent(q, k, v, default=blocked_attention, **branches)


def _segment_mask(segment_ids):
    """(B, T) ids -> (B, 1, T, T) bool: causal and same segment (for the dense paths)."""
    t = jnp.arange(segment_ids.shape[1])
    return visible(t, t, segment_ids, segment_ids)[:, None]


def _segmented(q, k, v, seg, impl):
    """:func:`causal_attention` with segment ids: the same dispatch, each backend masked."""
    if q.dtype == jnp.float64 and impl in ("auto", "xla"):
        return attention_reference(q, k, v, _segment_mask(seg))
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=_segment_mask(seg), is_causal=True,
                                            implementation="xla")
    if impl == "splash":
        return jax.lax.platform_dependent(
            q, k, v, seg, tpu=lambda q, k, v, s: splash_attention(q, k, v, segment_ids=s)
        )
    if impl != "auto":  # "cudnn" checks its inputs as without segments, then runs blocked
        check_attention_impl(impl, head_dim=q.shape[-1], dtype=q.dtype)
    blocked = lambda q, k, v, s: blocked_attention(q, k, v, segment_ids=s)
    if impl in ("blocked", "cudnn"):
        return blocked(q, k, v, seg)
    branches = {}
    if _tpu_possible():
        branches["tpu"] = lambda q, k, v, s: splash_attention(q, k, v, segment_ids=s)
    return jax.lax.platform_dependent(q, k, v, seg, default=blocked, **branches)


def _cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


# --------------------------------------------------------------------------------------------
# Reference and decoding
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Blocked (flash-style) attention in pure JAX
# --------------------------------------------------------------------------------------------


def _acc_dtype(dtype):
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def blocked_attention(q, k, v, *, block_size: int = BLOCK, segment_ids=None):
    """Causal attention by query and key blocks with an online softmax and a custom VJP.

    Shapes as :func:`causal_attention`. Query block i visits key blocks 0..i only (exact causal
    skipping); the backward pass recomputes each tile's probabilities from the saved row
    log-normalisers. Memory O(T * (d + block)) forward and backward, never (T, T). Matmul
    operands stay in the input dtype; scores, statistics and accumulators are float32
    (float64 for float64 inputs). ``segment_ids`` (B, T) int or None: every tile's causal
    mask is also restricted to the own segment.
    """
    B, T, H, d = q.shape
    c = max(1, min(int(block_size), T))
    tp = -(-T // c) * c
    if tp != T:
        # Pads sit after every real row, so causality keeps them out of real outputs; their
        # own rows are sliced off, and the zero upstream gradient there adds nothing. (A pad
        # row always sees itself, whatever its segment id.)
        pad = ((0, 0), (0, tp - T), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - T)), constant_values=-1)
    return _blocked(q, k, v, segment_ids, c)[:, :T]


# seg (B, Tp) int or None is a regular argument (it may be traced); its cotangent is None.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q, k, v, seg, c):
    return _blocked_forward(q, k, v, seg, c)[0]


def _tile_mask(rows, cols, seg, i, j, c):
    """Visibility of key block j to query block i: (c, c), or (B, 1, 1, c, c) with ids
    (broadcast over the (B, Hkv, R, q, k) score tile)."""
    if seg is None:
        return visible(rows, cols)
    seg_i = jax.lax.dynamic_slice_in_dim(seg, i * c, c, axis=1)
    seg_j = jax.lax.dynamic_slice_in_dim(seg, j * c, c, axis=1)
    return visible(rows, cols, seg_i, seg_j)[:, None, None]


def _group(q, k):
    """(B, T, H, d) queries -> (B, T, Hkv, R, d): query head h = g * R + r reads kv head g."""
    B, T, H, d = q.shape
    hkv = k.shape[2]
    return q.reshape(B, T, hkv, H // hkv, d)


def _blocked_forward(q, k, v, seg, c):
    """Returns o (B, Tp, H, d) in q's dtype and lse (B, Hkv, R, Tp) in the accumulator dtype."""
    B, tp, H, d = q.shape
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d)
    qg = _group(q, k)
    hkv, r = qg.shape[2], qg.shape[3]
    n = tp // c

    def q_step(_, i):
        q_i = jax.lax.dynamic_slice_in_dim(qg, i * c, c, axis=1)
        rows = i * c + jnp.arange(c)

        def kv_step(j, carry):
            m, l, o = carry
            if seg is not None:
                # Key blocks from the diagonal one down: that block holds every row's own key,
                # so m is finite after the first step (block 0 may hold no key of a row's
                # segment, and an all -inf first step would make exp(-inf - -inf) NaN).
                j = i - j
            k_j = jax.lax.dynamic_slice_in_dim(k, j * c, c, axis=1)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * c, c, axis=1)
            s = jnp.einsum("bqgrd,bkgd->bgrqk", q_i, k_j, preferred_element_type=acc) * scale
            s = jnp.where(_tile_mask(rows, j * c + jnp.arange(c), seg, i, j, c), s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bgrqk,bkgd->bgrqd", p.astype(v.dtype), v_j,
                            preferred_element_type=acc)
            return m_new, l, o * corr[..., None] + pv

        init = (jnp.full((B, hkv, r, c), -jnp.inf, acc), jnp.zeros((B, hkv, r, c), acc),
                jnp.zeros((B, hkv, r, c, d), acc))
        # Key block 0 holds column 0, visible to every row, so m is finite after the first step
        # (with segment ids the blocks run in reverse, see kv_step).
        m, l, o = jax.lax.fori_loop(0, i + 1, kv_step, init)
        o = (o / l[..., None]).astype(q.dtype)
        return None, (jnp.moveaxis(o, 3, 1), m + jnp.log(l))  # (B, c, Hkv, R, d), (B, Hkv, R, c)

    _, (o, lse) = jax.lax.scan(q_step, None, jnp.arange(n))
    o = jnp.moveaxis(o, 0, 1).reshape(B, tp, H, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, hkv, r, tp)
    return o, lse


def _blocked_fwd(q, k, v, seg, c):
    o, lse = _blocked_forward(q, k, v, seg, c)
    return o, (q, k, v, seg, o, lse)


def _blocked_bwd(c, res, do):
    """One sweep: key block j visits query blocks i >= j, finishing dk_j, dv_j and adding to dq.

    With P = exp(S - lse): dV = P^T dO;  dS = P * (dO V^T - delta), delta_t = dO_t . O_t;
    dQ = dS K / sqrt(d);  dK = dS^T Q / sqrt(d).
    """
    q, k, v, seg, o, lse = res
    B, tp, H, d = q.shape
    acc = _acc_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d)
    qg, dog = _group(q, k), _group(do, k)
    hkv, r = qg.shape[2], qg.shape[3]
    n = tp // c
    delta = jnp.einsum("btgrd,btgrd->bgrt", _group(o, k).astype(acc), dog.astype(acc))

    def kv_step(dq, j):
        k_j = jax.lax.dynamic_slice_in_dim(k, j * c, c, axis=1)
        v_j = jax.lax.dynamic_slice_in_dim(v, j * c, c, axis=1)
        cols = j * c + jnp.arange(c)

        def q_step(i, carry):
            dq, dk, dv = carry
            q_i = jax.lax.dynamic_slice_in_dim(qg, i * c, c, axis=1)
            do_i = jax.lax.dynamic_slice_in_dim(dog, i * c, c, axis=1)
            lse_i = jax.lax.dynamic_slice_in_dim(lse, i * c, c, axis=3)
            delta_i = jax.lax.dynamic_slice_in_dim(delta, i * c, c, axis=3)
            s = jnp.einsum("bqgrd,bkgd->bgrqk", q_i, k_j, preferred_element_type=acc) * scale
            seen = _tile_mask(i * c + jnp.arange(c), cols, seg, i, j, c)
            p = jnp.where(seen, jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("bgrqk,bqgrd->bkgd", p.astype(do.dtype), do_i,
                                 preferred_element_type=acc)
            dp = jnp.einsum("bqgrd,bkgd->bgrqk", do_i, v_j, preferred_element_type=acc)
            ds = p * (dp - delta_i[..., None])
            dk = dk + jnp.einsum("bgrqk,bqgrd->bkgd", ds.astype(q.dtype), q_i,
                                 preferred_element_type=acc) * scale
            dq_i = jnp.einsum("bgrqk,bkgd->bqgrd", ds.astype(k.dtype), k_j,
                              preferred_element_type=acc) * scale
            old = jax.lax.dynamic_slice_in_dim(dq, i * c, c, axis=1)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, old + dq_i, i * c, axis=1)
            return dq, dk, dv

        zeros = jnp.zeros((B, c, hkv, d), acc)
        dq, dk, dv = jax.lax.fori_loop(j, n, q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros((B, tp, hkv, r, d), acc)
    dq, (dk, dv) = jax.lax.scan(kv_step, dq0, jnp.arange(n))

    def unblock(x):  # (n, B, c, Hkv, d) -> (B, Tp, Hkv, d)
        return jnp.moveaxis(x, 0, 1).reshape(B, tp, hkv, d)

    return (dq.reshape(B, tp, H, d).astype(q.dtype), unblock(dk).astype(k.dtype),
            unblock(dv).astype(v.dtype), None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


# --------------------------------------------------------------------------------------------
# Splash attention (Pallas, TPU)
# --------------------------------------------------------------------------------------------


def _splash_blocks(T: int) -> tuple[int, int]:
    """(block, padded length): blocks are multiples of 128 that divide the padded length."""
    blk = min(BLOCK, -(-T // 128) * 128)
    return blk, -(-T // blk) * blk


@functools.lru_cache(maxsize=8)
def _const_block(shape: tuple[int, int], value: bool) -> np.ndarray:
    out = np.full(shape, value)
    out.flags.writeable = False
    return out


def _fast_causal_mask(tp: int):
    """splash's CausalMask, with whole blocks above or below the diagonal answered from a
    cached constant: splash classifies the mask block by block in numpy on the host, and
    evaluating every (512, 512) block took 35 s at T=32k and ~10 min at T=128k (quadratic)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    class _Causal(sa.CausalMask):
        def __getitem__(self, idx):
            q, kv = idx
            if isinstance(q, slice) and isinstance(kv, slice) and q.step in (None, 1) \
                    and kv.step in (None, 1) and None not in (q.start, q.stop, kv.start,
                                                              kv.stop):
                shape = (q.stop - q.start, kv.stop - kv.start)
                if kv.stop - 1 <= q.start:  # every key at or before every query
                    return _const_block(shape, True)
                if kv.start > q.stop - 1:  # every key after every query
                    return _const_block(shape, False)
            return super().__getitem__(idx)

    return _Causal((tp, tp))


@functools.lru_cache(maxsize=64)
def _splash_kernel(tp: int, heads: int, blk: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([_fast_causal_mask(tp)] * heads)
    bs = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                       block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                       block_kv_dq=blk)
    # Concrete mask tables (not tracers of whichever trace first built the kernel): cacheable.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha_single_device(mask, block_sizes=bs, interpret=interpret)


def _splash_local(q, k, v, seg=None, *, interpret: bool):
    """Splash on one device's shard. q: (B, Tp, H, d), k, v: (B, Tp, Hkv, d), seg (B, Tp) int
    or None, Tp padded."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    tp, H = q.shape[1], q.shape[2]
    blk, _ = _splash_blocks(tp)
    kernel = _splash_kernel(tp, H, blk, interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # (B, heads, Tp, d): one example per call
    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    if seg is None:
        o = jax.vmap(kernel)(q, k, v)
    else:  # the static causal mask and-ed with the ids' block-diagonal one, per example
        o = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s)))(
            q, k, v, seg)
    return jnp.swapaxes(o, 1, 2)


def _mesh_size(mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def splash_attention(q, k, v, *, interpret: bool = False, segment_ids=None):
    """Causal attention through Pallas splash attention (TPU; ``interpret=True`` runs anywhere).

    Shapes as :func:`causal_attention`; ``segment_ids`` (B, T) int or None goes to the kernel
    as ``SegmentIds``. T is padded to a multiple of the block (a multiple of
    128); splash takes no softmax scale, so q is scaled first. Inside
    :func:`sessa_jax.models.partitioning.activation_sharding` the kernel runs under
    ``shard_map`` over the mesh axes that the batch and head names map to (the ids split like
    the batch); outside any mesh (plain ``jit`` on one chip) it is called directly.
    """
    from sessa_jax.models.partitioning import active_mesh, logical_to_mesh

    B, T, H, d = q.shape
    _, tp = _splash_blocks(T)
    if tp != T:
        pad = ((0, 0), (0, tp - T), (0, 0), (0, 0))  # exact under the causal mask, as above
        q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
        if segment_ids is not None:  # a pad row still sees itself: no empty softmax row
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, tp - T)), constant_values=-1)
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    local = functools.partial(_splash_local, interpret=interpret)
    ids = () if segment_ids is None else (segment_ids.astype(jnp.int32),)
    active = active_mesh()
    if active is None:
        return local(q, k, v, *ids)[:, :T]
    mesh, rules = active
    spec = logical_to_mesh(("batch", None, "act_heads", None), rules)
    batch_axes, head_axes = spec[0], spec[2]
    if B % _mesh_size(mesh, batch_axes):
        batch_axes = None
    heads = _mesh_size(mesh, head_axes)
    if H % heads:
        head_axes = None
    elif k.shape[2] % heads:
        # kv heads cannot be split like the query heads: give every query head its own copy.
        k, v = (jnp.repeat(a, H // k.shape[2], axis=2) for a in (k, v))
    from jax.sharding import PartitionSpec as P

    spec = P(batch_axes, None, head_axes, None)
    in_specs = (spec,) * 3 + (() if segment_ids is None else (P(batch_axes, None),))
    o = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=spec,
                      check_vma=False)(q, k, v, *ids)
    return o[:, :T]
