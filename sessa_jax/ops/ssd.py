"""The SSD ("state space duality") scan of Mamba-2 (Dao & Gu 2024) as pure JAX functions.

Recurrence, per batch row b and head h (state h_t of shape (P, N)), with a *scalar* decay per
head and step (A is one negative number per head)::

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        h_{-1} = h0 (zeros if None)
    y_t = h_t C_t + Dskip x_t

Shapes: x (B, T, H, P); dt (B, T, H) positive (softplus'd, bias added); A (H,) negative;
Bm, Cm (B, T, G, N), G groups of H/G heads sharing one B and C (Mamba-2's ngroups; heads
h = g*(H/G) + k); Dskip (H,) or None; h0 / the final state (B, H, P, N).

``resets`` (B, T) bool, optional: True at the first token of a document; the state is zeroed
*before* that token (h_{t-1} := 0), so nothing crosses the boundary. dt = 0 steps (padding)
leave the state unchanged.

Two implementations of the same math:

* :func:`ssd_reference`: a ``lax.scan`` over time, the recurrence as written (T serial steps).
  The reference the chunked form is tested against.
* :func:`ssd_chunked`: the "matmul form". Time is cut into chunks of Q; with a_t = dt_t A and
  s_i the inclusive cumulative sum of a over the chunk,

      intra  y_i += sum_{j <= i} exp(s_i - s_j) (C_i . B_j) dt_j x_j     (Q x Q, like attention)
      state  S_c  = sum_j exp(s_last - s_j) dt_j x_j B_j^T              (what the chunk adds)
      carry  h_c  = exp(s_last) h_{c-1} + S_c                          (lax.scan over chunks)
      inter  y_i += exp(s_i) C_i . h_{c-1}

  Every large product is an einsum (tensor cores): C B^T, (mask * C B^T) x, x^T B, C h.
  The decay enters only as exp of a difference s_i - s_j with i >= j, or of s_i, s_last - s_j:
  all <= 0, so no exp of a large positive number ever happens (the upper triangle is set to
  -inf *before* the exp, so its gradient is 0, not NaN). A reset at k kills the pairs (i, j)
  with j < k <= i: a per-chunk running count of resets must be equal at i and j.

Dtypes: the product operands (x, B, C, the masked C B^T, the carried state) are cast to the
dtype of ``x`` (the compute dtype: bf16 in training) and accumulated in float32
(``preferred_element_type``), forward and backward (the cotangents enter the backward
products in the compute dtype: ``sessa_jax/ops/mixed_einsum.py``); dt, A, the cumulative sums,
the decays and the carried state are float32 (float64 when any input is float64, for the parity
tests). Outputs: float32 (float64).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from sessa_jax.ops.mixed_einsum import mixed_einsum


def _sdt(*arrays) -> jnp.dtype:
    """State / decay dtype: float64 if any floating input is float64, else float32."""
    for a in arrays:
        if a is not None and jnp.asarray(a).dtype == jnp.float64:
            return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _dot(spec, a, b, acc):
    """einsum with float32 (acc) accumulation; operands as given (the compute dtype). With
    16-bit operands the backward products take 16-bit operands too (``mixed_einsum``): plain
    autodiff would promote them to float32 with the float32 cotangents of y and the states."""
    return mixed_einsum(spec, a, b, acc)


def _check(x, dt, A, Bm, Cm):
    Bsz, T, H, P = x.shape
    if dt.shape != (Bsz, T, H):
        raise ValueError(f"ssd: dt {dt.shape}, expected (B, T, H) = {(Bsz, T, H)}")
    if A.shape != (H,):
        raise ValueError(f"ssd: A {A.shape}, expected (H,) = {(H,)}")
    if Bm.ndim != 4 or Bm.shape[:2] != (Bsz, T) or Cm.shape != Bm.shape:
        raise ValueError(f"ssd: Bm {Bm.shape}, Cm {Cm.shape}, expected both (B, T, G, N)")
    if H % Bm.shape[2]:
        raise ValueError(f"ssd: {H} heads are not divisible into {Bm.shape[2]} groups")


def _heads_bc(M, H):
    """(B, ..., G, N) -> (B, ..., H, N): each group's B or C repeated for its H/G heads."""
    return jnp.repeat(M, H // M.shape[-2], axis=-2)


# ------------------------------------------------------------------------ reference


def ssd_reference(x, dt, A, Bm, Cm, Dskip=None, h0=None, *, resets=None):
    """The recurrence as a ``lax.scan`` over time (see the module docstring for shapes).

    Returns y (B, T, H, P) and the final state (B, H, P, N), in float32 (float64).
    """
    _check(x, dt, A, Bm, Cm)
    sdt = _sdt(x, dt, A, Bm, Cm, Dskip, h0)
    Bsz, T, H, P = x.shape
    N = Bm.shape[-1]
    x, dt, A, Bm, Cm = (jnp.asarray(a, sdt) for a in (x, dt, A, Bm, Cm))
    Bh, Ch = _heads_bc(Bm, H), _heads_bc(Cm, H)
    h = jnp.zeros((Bsz, H, P, N), sdt) if h0 is None else jnp.asarray(h0, sdt)
    r = jnp.zeros((Bsz, T), bool) if resets is None else jnp.asarray(resets, bool)

    def step(h, inp):
        x_t, dt_t, B_t, C_t, r_t = inp  # (B, H, P), (B, H), (B, H, N), (B, H, N), (B,)
        h = jnp.where(r_t[:, None, None, None], 0.0, h)
        h = (jnp.exp(dt_t * A)[..., None, None] * h
             + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :])
        return h, jnp.einsum("bhpn,bhn->bhp", h, C_t)

    xs = tuple(jnp.swapaxes(a, 0, 1) for a in (x, dt, Bh, Ch, r))  # time-major
    hT, y = lax.scan(step, h, xs)
    y = jnp.swapaxes(y, 0, 1)
    if Dskip is not None:
        y = y + jnp.asarray(Dskip, sdt)[:, None] * x
    return y, hT


def ssd_step(x_t, dt_t, A, B_t, C_t, Dskip, h):
    """One recurrence step (decoding): x_t (B, H, P), dt_t (B, H), B_t, C_t (B, G, N),
    Dskip (H,) or None, h (B, H, P, N) -> y_t (B, H, P), new h, in the state dtype."""
    sdt = _sdt(x_t, dt_t, A, B_t, C_t, Dskip, h)
    H = x_t.shape[1]
    x_t, dt_t, A, h = (jnp.asarray(a, sdt) for a in (x_t, dt_t, A, h))
    Bh, Ch = (_heads_bc(jnp.asarray(a, sdt), H) for a in (B_t, C_t))
    h = (jnp.exp(dt_t * A)[..., None, None] * h
         + (dt_t[..., None] * x_t)[..., None] * Bh[:, :, None, :])
    y = jnp.einsum("bhpn,bhn->bhp", h, Ch)
    if Dskip is not None:
        y = y + jnp.asarray(Dskip, sdt)[:, None] * x_t
    return y, h


# ------------------------------------------------------------------------ chunked


def ssd_chunked(x, dt, A, Bm, Cm, Dskip=None, h0=None, *, resets=None, chunk_size: int = 128):
    """The matmul ("SSD") form, chunks of ``chunk_size`` (T need not be a multiple).

    Same arguments and results as :func:`ssd_reference`.
    """
    _check(x, dt, A, Bm, Cm)
    sdt = _sdt(x, dt, A, Bm, Cm, Dskip, h0)
    cd = jnp.dtype(sdt) if x.dtype == jnp.float64 else x.dtype  # product operand dtype
    Bsz, T, H, P = x.shape
    G, N = Bm.shape[2:]
    K = H // G
    if T == 0:
        h = jnp.zeros((Bsz, H, P, N), sdt) if h0 is None else jnp.asarray(h0, sdt)
        return jnp.zeros((Bsz, 0, H, P), sdt), h
    Q = max(1, min(int(chunk_size), T))
    nc = -(-T // Q)
    pad = nc * Q - T
    x_in = x
    dt = jnp.asarray(dt, sdt)
    if pad:  # dt = 0, x = B = C = 0 at pad steps: the identity step, outputs sliced off
        padt = lambda a: jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
        x, dt, Bm, Cm = padt(x), padt(dt), padt(Bm), padt(Cm)
        resets = None if resets is None else padt(jnp.asarray(resets, bool))

    # chunked views; heads split as (G, K) so B and C are shared by a group without copies
    xc = x.astype(cd).reshape(Bsz, nc, Q, G, K, P)
    Bc = Bm.astype(cd).reshape(Bsz, nc, Q, G, N)
    Cc = Cm.astype(cd).reshape(Bsz, nc, Q, G, N)
    a = (dt * jnp.asarray(A, sdt)).reshape(Bsz, nc, Q, G, K)  # log decay per step, <= 0
    dtc = dt.reshape(Bsz, nc, Q, G, K)
    s = jnp.cumsum(a, axis=2)  # (B, nc, Q, G, K), inclusive, non-increasing
    s_last = s[:, :, -1:]  # (B, nc, 1, G, K)

    causal = jnp.tril(jnp.ones((Q, Q), bool))  # [i, j]: j <= i
    if resets is None:
        pair_ok = causal  # (Q, Q)
        to_end = jnp.ones((), bool)  # token j reaches the chunk's end
        from_start = jnp.ones((), bool)  # the incoming state reaches token i
        carry_ok = jnp.ones((), bool)  # the incoming state reaches the chunk's end
    else:
        rc = jnp.cumsum(resets.reshape(Bsz, nc, Q).astype(jnp.int32), axis=2)  # resets <= i
        pair_ok = causal & (rc[..., :, None] == rc[..., None, :])  # (B, nc, Q, Q)
        pair_ok = pair_ok[:, :, None, None]  # (B, nc, 1, 1, Q, Q)
        to_end = (rc == rc[..., -1:])[..., None, None]  # (B, nc, Q, 1, 1)
        from_start = (rc == 0)[..., None, None]
        carry_ok = (rc[..., -1] == 0)[..., None, None]  # (B, nc, 1, 1)

    # -- intra-chunk: (L o C B^T) (dt x), L[i, j] = exp(s_i - s_j) on allowed pairs
    CB = _dot("bcign,bcjgn->bcgij", Cc, Bc, sdt)  # (B, nc, G, Q, Q), one per group
    sh = jnp.moveaxis(s, 2, -1)  # (B, nc, G, K, Q)
    diff = sh[..., :, None] - sh[..., None, :]  # (B, nc, G, K, Q, Q) [i, j] = s_i - s_j
    L = jnp.exp(jnp.where(pair_ok, diff, -jnp.inf))  # masked before the exp: 0, grad 0
    dt_j = jnp.moveaxis(dtc, 2, -1)[..., None, :]  # (B, nc, G, K, 1, Q)
    Mx = (CB[:, :, :, None] * L * dt_j).astype(cd)
    y = _dot("bcgkij,bcjgkp->bcigkp", Mx, xc, sdt)  # (B, nc, Q, G, K, P)

    # -- each chunk's own contribution to the state at its end (from zero)
    w = jnp.exp(s_last - s) * dtc  # (B, nc, Q, G, K), exp of <= 0
    w = jnp.where(to_end, w, 0.0)
    xw = (xc.astype(sdt) * w[..., None]).astype(cd)  # scaled in float32, then cast
    S = _dot("bcjgkp,bcjgn->bcgkpn", xw, Bc, sdt)

    # -- pass the states across chunks: h_c = exp(s_last) h_{c-1} + S_c (short serial scan)
    decay = jnp.where(carry_ok, jnp.exp(s_last[:, :, 0]), 0.0)  # (B, nc, G, K)
    h = (jnp.zeros((Bsz, G, K, P, N), sdt) if h0 is None
         else jnp.asarray(h0, sdt).reshape(Bsz, G, K, P, N))

    def carry(h, inp):
        S_c, d_c = inp
        return d_c[..., None, None] * h + S_c, h  # emit the state *entering* the chunk

    hT, h_in = lax.scan(carry, h, (jnp.moveaxis(S, 1, 0), jnp.moveaxis(decay, 1, 0)))
    h_in = jnp.moveaxis(h_in, 0, 1)  # (B, nc, G, K, P, N)

    # -- inter-chunk: exp(s_i) C_i . h_{c-1}
    y_off = _dot("bcign,bcgkpn->bcigkp", Cc, h_in.astype(cd), sdt)
    y = y + y_off * jnp.where(from_start, jnp.exp(s), 0.0)[..., None]

    y = y.reshape(Bsz, nc * Q, H, P)[:, :T]
    if Dskip is not None:
        y = y + jnp.asarray(Dskip, sdt)[:, None] * x_in.astype(sdt)
    return y, hT.reshape(Bsz, H, P, N)


def ssd(x, dt, A, Bm, Cm, Dskip=None, h0=None, *, resets=None, impl: str = "chunked",
        chunk_size: int = 128):
    """Dispatch: ``impl`` = "chunked" (:func:`ssd_chunked`) or "sequential" (the reference)."""
    if impl == "chunked":
        return ssd_chunked(x, dt, A, Bm, Cm, Dskip, h0, resets=resets, chunk_size=chunk_size)
    if impl == "sequential":
        return ssd_reference(x, dt, A, Bm, Cm, Dskip, h0, resets=resets)
    raise ValueError(f"impl={impl!r}: expected 'chunked' or 'sequential'")


# ------------------------------------------------------------------------ causal conv


def causal_conv(x, w, bias, resets=None, history=None):
    """Causal depthwise conv. x (B, T, F) new inputs; w (K, F) (w[K-1] multiplies the newest
    input), bias (F,); history (B, K-1, F) the K-1 inputs before x (oldest first), or None for
    zeros -> (B, T, F).

    out_t = bias + sum_k w[k] in[t + k - K + 1]: taps over inputs t-K+1 .. t, reaching into the
    history before t = K-1. With ``resets`` (B, T) bool, a tap that reaches before the last reset
    at or before t (into the previous document, or into the history) reads zero.

    Without a history (training) each tap is x shifted with zeros, which XLA fuses into the one
    multiply-add loop: no (B, K-1+T, F) copy of the input is made (one per layer and step).
    """
    K = w.shape[0]
    T = x.shape[1]
    if history is not None:
        xp = jnp.concatenate([history.astype(x.dtype), x], axis=1)
    if resets is not None:
        t = jnp.arange(T, dtype=jnp.int32)
        last = lax.cummax(jnp.where(resets, t, -K), axis=1)  # -K: no reset yet, all taps ok
        reach = (t - last)[..., None]  # (B, T, 1): how far back the document allows
    out = bias
    for k in range(K):  # K is small (4): K shifted multiply-adds beat a generic conv here
        lag = K - 1 - k
        if history is not None:
            tap = xp[:, k : k + T]
        elif lag:
            tap = jnp.pad(x, ((0, 0), (lag, 0), (0, 0)))[:, :T]
        else:
            tap = x
        if resets is not None and lag:
            tap = jnp.where(reach >= lag, tap, 0)
        out = out + w[k] * tap
    return out
