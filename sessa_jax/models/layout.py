"""The two parameter layouts of a DecoderLM's blocks, and conversion between them.

    unscanned (model.scan_layers=false): {'blocks': {0: {...}, 1: {...}, ...}}   one per block
    scanned   (model.scan_layers=true):  {'blocks': {...}}   every leaf (n_layers, *per-layer)

Layer i of the scanned layout is ``blocks.i`` of the unscanned one, leaf for leaf. The
functions walk any pytree of dicts, lists, tuples and named tuples, so they convert a params
dict, a whole TrainState's params and optimizer moments (optax keeps the params' structure),
and trees of ShapeDtypeStructs (abstract targets of a checkpoint restore), alike. Only a
``'blocks'`` entry is touched; everything else is returned as it is.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BLOCKS = "blocks"


def _is_unscanned_blocks(v) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(k, int) for k in v)


def is_scanned(params) -> bool:
    """True when ``params`` (a DecoderLM pure dict) holds its blocks stacked; False when per
    block. ValueError when there is no ``blocks`` entry."""
    if not isinstance(params, dict) or BLOCKS not in params:
        raise ValueError("not a DecoderLM parameter dict: no 'blocks' entry")
    return not _is_unscanned_blocks(params[BLOCKS])


def _walk(tree, fn: Callable[[Any], Any]):
    """Apply ``fn`` to the value of the 'blocks' key of every dict in ``tree`` that has one
    (any pytree: dicts, named tuples, flax dataclasses such as a TrainState)."""
    has_blocks = lambda x: isinstance(x, dict) and BLOCKS in x  # noqa: E731

    def convert(x):
        if not has_blocks(x):
            return x
        return {k: (fn(v) if k == BLOCKS else v) for k, v in x.items()}

    return jax.tree.map(convert, tree, is_leaf=has_blocks)


def _stack_leaf(*xs):
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        sh = x.sharding
        if isinstance(sh, NamedSharding):  # the layers axis is not sharded (rule 'layers': None)
            sh = NamedSharding(sh.mesh, P(None, *sh.spec))
        return jax.ShapeDtypeStruct((len(xs),) + tuple(x.shape), x.dtype, sharding=sh)
    if isinstance(x, np.ndarray):
        return np.stack(xs)
    return jnp.stack(xs)


def _unstack_leaf(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        sh = x.sharding
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, P(*tuple(sh.spec)[1:]))
        return jax.ShapeDtypeStruct(tuple(x.shape[1:]), x.dtype, sharding=sh)
    return x[i]


def stack_layers(tree):
    """Unscanned -> scanned: ``blocks.{0..n-1}`` become one ``blocks`` with a leading axis.
    A tree already scanned is returned unchanged."""

    def stack(blocks):
        if not _is_unscanned_blocks(blocks):
            return blocks
        n = len(blocks)
        if sorted(blocks) != list(range(n)):
            raise ValueError(f"blocks are numbered {sorted(blocks)}, expected 0..{n - 1}")
        return jax.tree.map(_stack_leaf, *(blocks[i] for i in range(n)))

    return _walk(tree, stack)


def unstack_layers(tree):
    """Scanned -> unscanned: ``blocks`` (leading axis n) becomes ``blocks.{0..n-1}``.
    A tree already unscanned is returned unchanged."""

    def unstack(blocks):
        if _is_unscanned_blocks(blocks):
            return blocks
        leaves = jax.tree.leaves(blocks)
        if not leaves:
            return blocks
        n = leaves[0].shape[0]
        return {i: jax.tree.map(lambda x: _unstack_leaf(x, i), blocks) for i in range(n)}

    return _walk(tree, unstack)


def to_layout(tree, scanned: bool):
    """``tree`` in the scanned (True) or unscanned (False) layout, whichever it is in now."""
    return stack_layers(tree) if scanned else unstack_layers(tree)
