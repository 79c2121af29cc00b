"""Rotary position embedding with interleaved pairs, as in docs/sessa.md.

Pairs are dims (0,1), (2,3), ...; inv_freq[i] = base^(-2i/d); angle = position * inv_freq[i];
(x_even, x_odd) -> (x_even cos - x_odd sin, x_even sin + x_odd cos).
"""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, base: float = 10000.0):
    """Rotate ``x`` (B, T, H, d) by ``positions`` (B, T) or (T,) integer positions.

    Angles are computed in float32 (float64 when ``x`` is float64), then cast back.
    """
    d = x.shape[-1]
    ang_dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    # The reference forms inv_freq = base^(-2i/d) in float32 and widens it; doing exactly that
    # is what makes float64 parity with its fixtures reach 1e-16 instead of 1e-8.
    inv_freq = (base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)).astype(ang_dtype)
    pos = jnp.asarray(positions, ang_dtype)
    if pos.ndim == 1:
        pos = pos[None, :]
    ang = pos[..., None] * inv_freq  # (B|1, T, d/2)
    cos = jnp.cos(ang)[:, :, None, :]  # broadcast over heads
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(ang_dtype)
    x_even, x_odd = xf[..., 0::2], xf[..., 1::2]
    out_even = x_even * cos - x_odd * sin
    out_odd = x_even * sin + x_odd * cos
    return jnp.stack([out_even, out_odd], axis=-1).reshape(x.shape).astype(x.dtype)
