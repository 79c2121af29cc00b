"""Mamba-2 block (Dao & Gu 2024, "Transformers are SSMs"), the fast SSM baseline.

``Mamba2Block``: ``y = x + Mixer(LayerNorm(x))`` with the Mamba-2 mixer

    (z, x)     = in_proj(u)                             D -> 2E        (no bias)
    (BC, dt_in) = bcdt_proj(u)                          D -> 2GN + H   (no bias)
    x, BC      = SiLU(causal depthwise conv1d(x, BC))   d_conv taps on x, B and C, + bias
    dt     = softplus(dt_in + dt_bias)                  one step size per head, float32
    y      = SSD(x, dt, A = -exp(A_log), B, C) + D x    scalar decay per head (ops/ssd.py)
    y      = RMSNorm(y * SiLU(z)) * norm_weight         gated, per group of E/G channels
    out    = out_proj(y)                                E -> D   (no bias)

with E = expand * D (``cfg.d_inner``), P = ``head_dim``, H = E / P heads (x is H heads of P),
N = ``d_state``, G = ``ngroups`` (B, C: G groups of N). Unlike Mamba-1 there is no x_proj /
dt_proj: B, C and dt come straight from the input, and A is one number per head, which is what
lets the scan run as matmuls. The in-projection is the paper's one (D, 2E + 2GN + H) matrix
held as two: the (z, x) part has the inner width E that tensor parallelism splits (by heads),
the (B, C, dt) part is small and replicated, as B and C are shared by every head of a group.

Init as described in the paper's reference layout: dt_bias the inverse softplus of a log-uniform
dt in [dt_min, dt_max] (floored at 1e-4), A = U(1, 16) per head (A_log = log A), D = 1, the norm
weight 1, the conv and the projections with PyTorch's defaults (U(+-fan_in^-1/2)).

The same inference interface as every block family: ``__call__`` (full sequence, optional
document ``resets`` / ``segment_ids``), ``init_cache`` / ``prefill`` (right-padded prompts with
``lengths``) / ``decode_step``.

Parameter layout (logical axes): in_proj.kernel (D, 2E) ("embed", "mlp"), columns [z | x];
bcdt_proj.kernel (D, 2GN + H) ("embed", None), columns [B | C | dt]; conv_kernel (K, E + 2GN)
("conv", None) and conv_bias (E + 2GN,) (None,) over the channels [x | B | C], conv_kernel[k, f]
= torch conv1d.weight[f, 0, k] (tiny: replicated); dt_bias, A_log, D (H,) (replicated);
norm_weight (E,) ("norm",); out_proj.kernel (E, D) ("mlp", "embed").
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from sessa_jax.models.config import Mamba2Config, to_dtype
from sessa_jax.models.layers import layer_norm, linear, logical, torch_uniform
from sessa_jax.models.mamba import dt_bias_init
from sessa_jax.models.partitioning import constrain
from sessa_jax.ops.segments import segment_starts
from sessa_jax.ops.ssd import causal_conv, ssd, ssd_step

_A_INIT_RANGE = (1.0, 16.0)


@struct.dataclass
class Mamba2Cache:
    """Decoding state of one Mamba-2 block.

    conv: (B, d_conv - 1, E + 2GN) the last d_conv - 1 inputs to the conv (oldest first), in the
          compute dtype.
    ssm:  (B, H, P, N) the SSM state, float32 (float64 for float64 compute).
    pos:  (B,) int32 tokens consumed per row.
    """

    conv: jax.Array
    ssm: jax.Array
    pos: jax.Array


def _a_log_init(key, shape, dtype=jnp.float32):
    lo, hi = _A_INIT_RANGE
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)


class Mamba2Block(nnx.Module):
    """Pre-norm residual Mamba-2 block: (B, T, D) -> (B, T, D). See the module docstring."""

    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, E, H, K, F = cfg.d_model, cfg.d_inner, cfg.n_heads, cfg.d_conv, cfg.conv_dim
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        pdt = to_dtype(cfg.param_dtype)
        par = lambda init, names, shape: nnx.Param(logical(init, names)(rngs.params(), shape, pdt))

        self.norm = layer_norm(D, cfg.ln_eps, **kw)
        self.in_proj = linear(D, 2 * E, ("embed", "mlp"), use_bias=False, **kw)
        self.bcdt_proj = linear(D, F - E + H, ("embed", None), use_bias=False, **kw)
        self.conv_kernel = par(torch_uniform(K), ("conv", None), (K, F))  # fan_in K: depthwise
        self.conv_bias = par(torch_uniform(K), (None,), (F,))
        self.dt_bias = par(dt_bias_init(cfg), (None,), (H,))
        self.A_log = par(_a_log_init, (None,), (H,))
        self.D = par(nnx.initializers.ones_init(), (None,), (H,))
        self.norm_weight = par(nnx.initializers.ones_init(), ("norm",), (E,))
        self.out_proj = linear(E, D, ("mlp", "embed"), use_bias=False, **kw)

    # ------------------------------------------------------------------ internals

    @property
    def _dtype(self):
        return to_dtype(self.cfg.dtype)

    @property
    def _sdt(self):
        """State / decay dtype: float32, or float64 when the compute dtype is float64."""
        return jnp.dtype(jnp.float64 if self._dtype == jnp.float64 else jnp.float32)

    def _project(self, u):
        """u (..., D) -> z, x (..., E), BC (..., 2GN), dt_in (..., H)."""
        E, F = self.cfg.d_inner, self.cfg.conv_dim
        # z and x as two products with the halves of the one (D, 2E) kernel, not one product
        # sliced: the sliced form's backward concatenates dz and dx into a (B, T, 2E) buffer
        # (one full copy per layer, ~4% of a 125M step on an H200).
        dt = self._dtype
        W = self.in_proj.kernel[...].astype(dt)
        u = u.astype(dt)
        # Each product on its own copy of u (an optimization barrier is an identity): XLA's dot
        # merger would otherwise fuse x's product with the (B, C, dt) one into a (D, E + 2GN + H)
        # product whose odd width (2271 at 125M) runs as a Triton GEMM at about a fifth of
        # cuBLAS's rate, and whose backward concatenates the two cotangents first (H200, 125M:
        # 20 ms of a 135 ms step; benchmarks/h200_2026-12-03b/).
        ux, ub = jax.lax.optimization_barrier((u, u))
        z, x = u @ W[:, :E], ux @ W[:, E:]
        bcdt = self.bcdt_proj(ub)
        return z, x, bcdt[..., : F - E], bcdt[..., F - E :]

    def _conv(self, x, bc, hx=None, hbc=None, resets=None):
        """The conv on x (B, T, E) and on (B, C) (B, T, 2GN), with their K-1 history inputs hx,
        hbc (or None: zeros) -> SiLU(conv) of each, (B, T, E) and (B, T, 2GN). Two convs, not
        one on [x | B | C]: x is split by tensor parallelism, B and C are not."""
        E = self.cfg.d_inner
        w = self.conv_kernel[...].astype(self._dtype)
        b = self.conv_bias[...].astype(self._dtype)
        return (jax.nn.silu(causal_conv(x, w[:, :E], b[:E], resets, hx)),
                jax.nn.silu(causal_conv(bc, w[:, E:], b[E:], resets, hbc)))

    def _ssm_inputs(self, x, bc, dt_in):
        """Conv outputs x (..., E), bc (..., 2GN) and dt_in (..., H) -> x (..., H, P), B, C
        (..., G, N) in the compute dtype, dt (..., H) in the state dtype (the bias added in
        float32: a bf16 bias near -7 would be off by ~3% in dt)."""
        c = self.cfg
        G, N = c.ngroups, c.d_state
        lead = x.shape[:-1]
        x = x.reshape(*lead, c.n_heads, c.head_dim)
        Bm = bc[..., : G * N].reshape(*lead, G, N)
        Cm = bc[..., G * N :].reshape(*lead, G, N)
        sdt = self._sdt
        dt = jax.nn.softplus(dt_in.astype(sdt) + self.dt_bias[...].astype(sdt))
        return x, Bm, Cm, dt

    def _gated_out(self, y, z):
        """y (..., E) SSD output, z (..., E) gate -> out_proj(RMSNorm(y * SiLU(z))) with the RMS
        taken over each group's E/G channels, computed in the state dtype (float32)."""
        c = self.cfg
        sdt = self._sdt
        g = y.astype(sdt) * jax.nn.silu(z.astype(sdt))
        gg = g.reshape(*g.shape[:-1], c.ngroups, c.d_inner // c.ngroups)
        gg = gg * jax.lax.rsqrt(jnp.mean(gg * gg, axis=-1, keepdims=True) + c.ln_eps)
        g = gg.reshape(g.shape) * self.norm_weight[...].astype(sdt)
        return self.out_proj(g.astype(self._dtype))

    def _mix_seq(self, u, conv_state, h0, mask, resets):
        """Mixer over a sequence. u (B, T, D) normed input; conv_state (B, K-1, F) or None
        (zeros); h0 (B, H, P, N) or None; mask (B, T) bool or None (False: pad, the state does
        not advance); resets (B, T) bool or None (True: a document starts, state and conv
        restart). Returns out (B, T, D), the conv inputs with history xp (B, K-1+T, E) and
        bcp (B, K-1+T, 2GN) (None when conv_state is None), and the final state."""
        B, T, _ = u.shape
        E = self.cfg.d_inner
        inner = ("batch", "length", "act_mlp")
        z, x, bc, dt_in = self._project(u)
        z, x = constrain(z, inner), constrain(x, inner)
        if conv_state is None:  # training: a zero history, no copy of the inputs
            hx = hbc = xp = bcp = None
        else:
            conv_state = conv_state.astype(x.dtype)
            hx, hbc = conv_state[..., :E], conv_state[..., E:]
            xp = jnp.concatenate([hx, x], axis=1)  # for prefill's cache of the last inputs
            bcp = jnp.concatenate([hbc, bc], axis=1)
        xc, bcc = self._conv(x, bc, hx, hbc, resets)
        x, Bm, Cm, dt = self._ssm_inputs(xc, bcc, dt_in)
        if mask is not None:
            dt = jnp.where(mask[..., None], dt, 0.0)  # dt = 0: decay 1, nothing added
        sdt = self._sdt
        A = -jnp.exp(self.A_log[...].astype(sdt))
        y, hT = ssd(x, dt, A, Bm, Cm, self.D[...].astype(sdt), h0, resets=resets,
                    impl=self.cfg.scan_impl, chunk_size=self.cfg.chunk_size)
        # y leaves the scan in the compute dtype, as an attention output does: XLA fuses the cast
        # into the scan's last fusion, so the (B, T, E) float32 y is never written, nor its
        # cotangent; the gate and norm upcast it again (float32 models: no-op)
        y = y.astype(self._dtype).reshape(B, T, E)
        return self._gated_out(y, z), xp, bcp, hT

    # ------------------------------------------------------------------ public API

    def __call__(self, x: jax.Array, segment_ids: Optional[jax.Array] = None, *,
                 resets: Optional[jax.Array] = None) -> jax.Array:
        """Full sequence: x (B, T, D) -> (B, T, D).

        resets (B, T) bool: True at a document's first token (the state and the conv window
        restart there). segment_ids (B, T) int: packed documents, turned into resets by
        ``sessa_jax.ops.segments.segment_starts`` (give one or the other).
        """
        if segment_ids is not None:
            if resets is not None:
                raise ValueError("Mamba2Block: give segment_ids or resets, not both")
            resets = segment_starts(segment_ids)
        out = self._mix_seq(self.norm(x), None, None, None, resets)[0]
        return x + out.astype(x.dtype)

    def init_cache(self, batch_size: int, max_len: int) -> Mamba2Cache:
        """Empty cache for ``batch_size`` rows. ``max_len`` is unused (the state is O(1) in T);
        accepted so that every block family has the same signature."""
        del max_len
        c = self.cfg
        return Mamba2Cache(
            conv=jnp.zeros((batch_size, c.d_conv - 1, c.conv_dim), self._dtype),
            ssm=jnp.zeros((batch_size, c.n_heads, c.head_dim, c.d_state), self._sdt),
            pos=jnp.zeros((batch_size,), jnp.int32),
        )

    def prefill(
        self, x: jax.Array, cache: Mamba2Cache, lengths: Optional[jax.Array] = None
    ) -> tuple[jax.Array, Mamba2Cache]:
        """Consume right-padded prompts x (B, T, D); ``lengths`` (B,) int32 real lengths (None: T).

        Returns y (B, T, D) (pad positions arbitrary) and the cache after exactly ``lengths[b]``
        tokens of row b: pad steps get dt = 0 (the state stops at the last real token) and the
        conv window is gathered from the last real inputs. The cache's states are used as
        history, so this also continues a non-fresh cache (pos advances by lengths).
        """
        B, T, _ = x.shape
        K = self.cfg.d_conv
        if lengths is None:
            lengths = jnp.full((B,), T, jnp.int32)
            mask = None
        else:
            lengths = jnp.asarray(lengths, jnp.int32)
            mask = jnp.arange(T)[None, :] < lengths[:, None]
        out, xp, bcp, hT = self._mix_seq(self.norm(x), cache.conv, cache.ssm, mask, None)
        # xp index of token t is t + K - 1: the K - 1 inputs ending at token lengths - 1.
        idx = (lengths[:, None] + jnp.arange(K - 1)[None, :])[..., None]  # (B, K-1, 1)
        conv = jnp.concatenate([jnp.take_along_axis(xp, idx, axis=1),
                                jnp.take_along_axis(bcp, idx, axis=1)], axis=-1)
        new = Mamba2Cache(conv=conv.astype(cache.conv.dtype), ssm=hT.astype(cache.ssm.dtype),
                          pos=cache.pos + lengths)
        return x + out.astype(x.dtype), new

    def decode_step(
        self, x_t: jax.Array, cache: Mamba2Cache, *, check: bool = True
    ) -> tuple[jax.Array, Mamba2Cache]:
        """One token per row: x_t (B, 1, D) -> y_t (B, 1, D) and the advanced cache.

        ``check`` is accepted for interface uniformity: an SSM state has no length limit.
        """
        del check
        E = self.cfg.d_inner
        z, x, bc, dt_in = self._project(self.norm(x_t)[:, 0])  # (B, E), (B, E), (B, 2GN), (B, H)
        hist = cache.conv.astype(x.dtype)  # (B, K-1, F)
        xp = jnp.concatenate([hist[..., :E], x[:, None]], axis=1)  # (B, K, E)
        bcp = jnp.concatenate([hist[..., E:], bc[:, None]], axis=1)
        xc, bcc = self._conv(x[:, None], bc[:, None], hist[..., :E], hist[..., E:])
        x, Bm, Cm, dt = self._ssm_inputs(xc[:, 0], bcc[:, 0], dt_in)
        sdt = cache.ssm.dtype
        A = -jnp.exp(self.A_log[...].astype(sdt))
        y, h = ssd_step(x, dt, A, Bm, Cm, self.D[...].astype(sdt), cache.ssm)
        out = self._gated_out(y.astype(self._dtype).reshape(y.shape[0], -1), z)[:, None]
        conv = jnp.concatenate([xp[:, 1:], bcp[:, 1:]], axis=-1)
        new = Mamba2Cache(conv=conv.astype(cache.conv.dtype), ssm=h.astype(cache.ssm.dtype),
                          pos=cache.pos + 1)
        return x_t + out.astype(x_t.dtype), new
