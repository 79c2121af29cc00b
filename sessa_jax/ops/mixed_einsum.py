"""A two-operand einsum in mixed precision: 16-bit operands, float32 accumulation and result,
and a backward pass whose products also take 16-bit operands.

Why: ``jnp.einsum(spec, a, b, preferred_element_type=float32)`` with bf16 ``a``, ``b`` runs the
forward product at the bf16 rate, but plain autodiff then multiplies the *float32* cotangent
with the bf16 operands, which promotes both backward products to float32 (TF32 GEMMs on an
H200: about half the bf16 rate, twice the operand bytes). Here the cotangent is cast to the
operands' dtype first, as a flash-attention backward does with dO; accumulation stays float32.

Used where a 16-bit model's large products feed float32 math: the LM head (float32 logits) and
the SSD scan of Mamba-2 (float32 outputs and states). float32 and float64 operands
differentiate as usual (the cast would be a no-op), so float64 parity tests are unaffected.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, acc=jnp.float32) -> jax.Array:
    """``einsum(spec, a, b)`` accumulated (and returned) in ``acc``.

    ``spec``: an explicit two-operand spec ``"ab,bc->ac"`` (``...`` allowed) in which every
    index of an operand appears in the other operand or in the output (true of any product;
    it is what lets the backward be two einsums of the same spec). With 16-bit operands of one
    dtype and ``acc`` float32, the backward products run on 16-bit operands; otherwise this is
    ``jnp.einsum(..., preferred_element_type=acc)``.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if (a.dtype != b.dtype or jnp.dtype(a.dtype).itemsize != 2
            or jnp.dtype(acc) != jnp.float32):
        return jnp.einsum(spec, a, b, preferred_element_type=acc)
    _check_spec(spec)
    return _mixed(spec, a, b)


def _check_spec(spec: str) -> None:
    if "->" not in spec or spec.count(",") != 1:
        raise ValueError(f"mixed_einsum: {spec!r}: expected an explicit 'a,b->out' spec")
    ins, out = spec.replace("...", ".").split("->")
    sa, sb = ins.split(",")
    for name, mine, others in (("first", sa, sb + out), ("second", sb, sa + out)):
        lone = sorted(set(mine) - set(others))
        if lone:
            raise ValueError(
                f"mixed_einsum: {spec!r}: index {''.join(lone)!r} of the {name} operand is in "
                "neither the other operand nor the output (sum it out before the product)"
            )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _mixed_fwd(spec, a, b):
    return _mixed(spec, a, b), (a, b)


def _mixed_bwd(spec, res, g):
    a, b = res
    g = g.astype(a.dtype)
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    da = jnp.einsum(f"{out},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{out},{sa}->{sb}", g, a, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)
