"""Small building blocks shared by every model family.

Parameters carry *logical* axis names (see :mod:`sessa_jax.models.partitioning`), never mesh
axes: the training code maps names to a mesh with a rule table, so model code never changes
when the mesh does.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sessa_jax.models.config import to_dtype


def torch_uniform(fan_in: int):
    """PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / (fan_in ** 0.5)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def logical(init, names: Sequence[Optional[str]]):
    """Attach logical axis names to an initializer (metadata only: no mesh needed to build)."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def linear(
    d_in: int,
    d_out: int,
    axes: tuple[Optional[str], Optional[str]],
    *,
    dtype: str,
    param_dtype: str,
    rngs: nnx.Rngs,
    use_bias: bool = True,
) -> nnx.Linear:
    """A Linear with PyTorch-default init and logical axis names ``axes`` = (in, out)."""
    init = torch_uniform(d_in)
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=to_dtype(dtype),
        param_dtype=to_dtype(param_dtype),
        kernel_init=logical(init, axes),
        bias_init=logical(init, (axes[1],)),
        rngs=rngs,
    )


def split_products(lin: nnx.Linear, x, n: int = 2) -> tuple:
    """``jnp.split(lin(x), n, axis=-1)`` as n products with the column blocks of lin's kernel.

    Same values; the point is the backward. Splitting one product's output makes its backward
    concatenate the n cotangents into a (..., d_out) buffer (one activation-sized copy a
    layer: 3.2 ms of a 139.5 ms 125M Sessa step at T=2048 on an H100, 2026-12-08); with one
    product a block, only the kernel's (d_in, d_out) gradient is assembled. Each product gets
    its own copy of x through an optimization barrier (an identity) so that XLA's dot merger
    does not fuse them back into one.
    """
    dt = lin.dtype or x.dtype
    W = lin.kernel[...].astype(dt)
    bias = None if lin.bias is None else lin.bias[...].astype(dt)
    w = W.shape[1] // n
    xs = jax.lax.optimization_barrier((x.astype(dt),) * n)
    out = []
    for i, xi in enumerate(xs):
        y = xi @ W[:, i * w:(i + 1) * w]
        out.append(y if bias is None else y + bias[i * w:(i + 1) * w])
    return tuple(out)


def layer_norm(d: int, eps: float, *, dtype: str, param_dtype: str, rngs: nnx.Rngs):
    """LayerNorm with learned scale (init 1) and bias (init 0), statistics in float32."""
    return nnx.LayerNorm(
        d,
        epsilon=eps,
        dtype=to_dtype(dtype),
        param_dtype=to_dtype(param_dtype),
        use_fast_variance=False,  # two-pass variance, as PyTorch does: needed for 1e-10 parity
        scale_init=logical(nnx.initializers.ones_init(), ("norm",)),
        bias_init=logical(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def rms_norm(d: int, eps: float, *, dtype: str, param_dtype: str, rngs: nnx.Rngs):
    """RMSNorm with a learned scale (init 1) and no bias, statistics in float32."""
    return nnx.RMSNorm(
        d,
        epsilon=eps,
        dtype=to_dtype(dtype),
        param_dtype=to_dtype(param_dtype),
        use_fast_variance=False,
        scale_init=logical(nnx.initializers.ones_init(), ("norm",)),
        rngs=rngs,
    )
