"""Selective scan of Mamba-1 (Gu & Dao 2023) as pure JAX functions.

Recurrence, per batch row b, channel e and state index n (shapes below), with the zero-order-hold
style discretisation of Mamba's reference ``selective_scan_ref`` (dA = exp(dt*A), dB*x = dt*B*x)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * Bm_t * x_t         h_{-1} = h0 (zeros if None)
    y_t = sum_n Cm_t[n] * h_t[:, n] + Dskip * x_t

Shapes: x, dt (B, T, E); A (E, N) (negative, i.e. -exp(A_log)); Bm, Cm (B, T, N);
Dskip (E,); h0 / final state (B, E, N). ``dt`` must already be positive (softplus'd, bias added).

Packed documents (``segment_ids``, :mod:`sessa_jax.ops.segments`): at the first token of every
segment after the row's first, the decay exp(dt*A) is replaced by 0, so h_t = dt_t*Bm_t*x_t
forgets the previous document (the row's first segment starts from h0 as usual).

Three implementations of the same math (``selective_scan(..., impl=...)``):

* ``"sequential"``: a ``lax.scan`` over time, one (B, E, N) state live at a time. The reference;
  T serial steps. Its backward stores the (B, E, N) state per step: O(B*T*E*N).
* ``"associative"``: ``lax.associative_scan`` over time on pairs (a_t, b_t) = (exp(dt*A),
  dt*B*x) with (a1, b1) o (a2, b2) = (a2*a1, a2*b1 + b2). O(log T) depth but it materialises
  every state: O(B*T*E*N) memory forward and backward.
* ``"chunked"``: time split into chunks of ``chunk_size`` (C); an associative scan inside each
  chunk, the (B, E, N) state carried between chunks by a ``lax.scan``. Each chunk body is
  rematerialised (``jax.checkpoint``), so live memory is O(B*C*E*N) forward and backward, plus
  the O(B*(T/C)*E*N) chunk-boundary states kept for the backward pass.

All arithmetic is done in float32, or float64 when any floating input is float64; outputs are
returned in that compute dtype (callers cast).
"""

from __future__ import annotations

from typing import Literal, Optional

import jax
import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.segments import segment_starts

ScanImpl = Literal["associative", "chunked", "sequential"]

_HI = lax.Precision.HIGHEST  # keep the C.h contraction out of TF32/bf16 passes on GPU/TPU


def scan_dtype(*arrays) -> jnp.dtype:
    """float64 if any floating input is float64, else float32."""
    for a in arrays:
        if a is not None and jnp.asarray(a).dtype == jnp.float64:
            return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _combine(left, right):
    # (a1, b1) then (a2, b2): h -> a2*(a1*h + b1) + b2.
    a1, b1 = left
    a2, b2 = right
    return a2 * a1, a2 * b1 + b2


def _decay(dt, A, keep):
    """exp(dt * A): (..., E), (E, N) -> (..., E, N); 0 where ``keep`` (...) is False (a
    segment start: the previous state is dropped). keep None: no resets."""
    dA = jnp.exp(dt[..., None] * A)
    return dA if keep is None else jnp.where(keep[..., None, None], dA, 0.0)


def _discretise(x, dt, A, Bm, keep):
    """(B, L, E), (B, L, E), (E, N), (B, L, N), keep (B, L) | None -> dA, dBx (B, L, E, N)."""
    dA = _decay(dt, A, keep)
    dBx = (dt * x)[..., None] * Bm[:, :, None, :]
    return dA, dBx


def _assoc_states(x, dt, A, Bm, h0, keep=None):
    """All states h_t of one time block (B, L, E, N), starting from h0 (B, E, N)."""
    dA, dBx = _discretise(x, dt, A, Bm, keep)
    # Fold the initial state into the first element: h_0 = a_0*h0 + b_0.
    dBx = dBx.at[:, 0].add(dA[:, 0] * h0)
    _, h = lax.associative_scan(_combine, (dA, dBx), axis=1)
    return h


def _sequential(x, dt, A, Bm, Cm, h0, keep):
    def step(h, inp):
        x_t, dt_t, B_t, C_t, keep_t = inp  # (B, E), (B, E), (B, N), (B, N), (B,) | None
        h = _decay(dt_t, A, keep_t) * h + (dt_t * x_t)[..., None] * B_t[:, None, :]
        y_t = jnp.einsum("ben,bn->be", h, C_t, precision=_HI)
        return h, y_t

    time_major = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)  # for lax.scan
    hT, y = lax.scan(step, h0, tuple(time_major(a) for a in (x, dt, Bm, Cm, keep)))
    return jnp.swapaxes(y, 0, 1), hT


def _associative(x, dt, A, Bm, Cm, h0, keep):
    h = _assoc_states(x, dt, A, Bm, h0, keep)
    y = jnp.einsum("bten,btn->bte", h, Cm, precision=_HI)
    return y, h[:, -1]


def _chunked(x, dt, A, Bm, Cm, h0, keep, chunk_size):
    Bsz, T, E = x.shape
    C = max(1, min(chunk_size, T))
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    if pad:
        # dt = 0 and x = 0 at pad steps give (a, b) = (1, 0): the identity, so the final state
        # is the state after step T-1. Padded outputs are sliced off below.
        # (keep = True there: no reset either.)
        padt = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
        x, dt, Bm, Cm = padt(x), padt(dt), padt(Bm), padt(Cm)
        if keep is not None:
            keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=True)

    def to_chunks(a):  # (B, nC*C, ...) -> (nC, B, C, ...): chunk-major for lax.scan
        if a is None:
            return None
        return jnp.swapaxes(a.reshape((Bsz, n_chunks, C) + a.shape[2:]), 0, 1)

    # Rematerialise the chunk body: the backward pass then keeps only each chunk's input state
    # instead of every (B, C, E, N) intermediate of every chunk (which would be O(B*T*E*N)).
    @jax.checkpoint
    def chunk(h, inp):
        x_c, dt_c, B_c, C_c, keep_c = inp
        hs = _assoc_states(x_c, dt_c, A, B_c, h, keep_c)  # (B, C, E, N)
        y_c = jnp.einsum("bten,btn->bte", hs, C_c, precision=_HI)
        return hs[:, -1], y_c

    hT, y = lax.scan(chunk, h0, tuple(to_chunks(a) for a in (x, dt, Bm, Cm, keep)))
    y = jnp.swapaxes(y, 0, 1).reshape(Bsz, n_chunks * C, E)[:, :T]
    return y, hT


def selective_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    Bm: jax.Array,
    Cm: jax.Array,
    Dskip: jax.Array,
    h0: Optional[jax.Array] = None,
    *,
    impl: ScanImpl = "chunked",
    chunk_size: int = 16,
    segment_ids: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
    """Mamba-1 selective scan (see the module docstring for the recurrence).

    Args:
      x: (B, T, E) inputs.
      dt: (B, T, E) positive step sizes (already softplus'd). dt = 0 leaves the state unchanged.
      A: (E, N) negative state matrix (diagonal per channel).
      Bm, Cm: (B, T, N) input-dependent input / output projections.
      Dskip: (E,) skip connection.
      h0: optional (B, E, N) initial state (zeros if None).
      impl: "sequential" | "associative" | "chunked".
      chunk_size: time steps per chunk for ``impl="chunked"``; T need not be a multiple.
      segment_ids: optional (B, T) int document ids: the state restarts (decay 0) at every
        change of id. None: no resets.

    Returns:
      y (B, T, E) and the final state h_{T-1} (B, E, N), in float32 (float64 for x64 inputs).
    """
    dtype = scan_dtype(x, dt, A, Bm, Cm, Dskip, h0)
    x, dt, A, Bm, Cm, Dskip = (jnp.asarray(a, dtype) for a in (x, dt, A, Bm, Cm, Dskip))
    Bsz, T, E = x.shape
    N = A.shape[-1]
    h0 = jnp.zeros((Bsz, E, N), dtype) if h0 is None else jnp.asarray(h0, dtype)
    if T == 0:
        return jnp.zeros((Bsz, 0, E), dtype), h0
    keep = None if segment_ids is None else ~segment_starts(segment_ids)
    if impl == "sequential":
        y, hT = _sequential(x, dt, A, Bm, Cm, h0, keep)
    elif impl == "associative":
        y, hT = _associative(x, dt, A, Bm, Cm, h0, keep)
    elif impl == "chunked":
        y, hT = _chunked(x, dt, A, Bm, Cm, h0, keep, int(chunk_size))
    else:
        raise ValueError(f"impl={impl!r}: expected 'associative', 'chunked' or 'sequential'")
    return y + Dskip * x, hT


def selective_scan_step(
    x_t: jax.Array,
    dt_t: jax.Array,
    A: jax.Array,
    B_t: jax.Array,
    C_t: jax.Array,
    Dskip: jax.Array,
    h: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One recurrence step (decoding): x_t, dt_t (B, E); B_t, C_t (B, N); h (B, E, N).

    Returns y_t (B, E) and the new state (B, E, N), in the scan compute dtype.
    """
    dtype = scan_dtype(x_t, dt_t, A, B_t, C_t, Dskip, h)
    x_t, dt_t, A, B_t, C_t, Dskip, h = (
        jnp.asarray(a, dtype) for a in (x_t, dt_t, A, B_t, C_t, Dskip, h)
    )
    h = _decay(dt_t, A, None) * h + (dt_t * x_t)[..., None] * B_t[:, None, :]
    y_t = jnp.einsum("ben,bn->be", h, C_t, precision=_HI) + Dskip * x_t
    return y_t, h
