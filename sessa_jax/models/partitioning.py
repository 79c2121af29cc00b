"""Logical axis names used by the models, and how they map onto a device mesh.

Model parameters are annotated with the names below. A *rule table* maps each name to a mesh
axis (or a tuple of them, or None for replicated); :func:`logical_to_mesh` turns a tree of
logical ``PartitionSpec``s into mesh ``PartitionSpec``s. Changing the parallelism plan is a
change of rules, never of model code.

Names:
  embed  model width D            vocab  vocabulary
  heads  query heads x head dim   kv     key/value heads x head dim
  mlp    any inner width (MLP hidden, Sessa's in-projection, Mamba's expanded width)
  fb     Sessa's feedback projection outputs (single full-width head)
  state  SSM state size           conv   SSM convolution taps
  norm   LayerNorm scale/bias     layers stacked-layer axis (scanned layers)

Activations are annotated too (``constrain``), so that GSPMD keeps the batch sharded inside
the model instead of trading it for the fsdp-sharded weight width: without them XLA:TPU
all-gathered the batch and built the (B, H, T, T) attention logits for the *global* batch.
  batch      rows                 length   positions
  act_embed  residual-stream width (replicated: FSDP gathers weights, not activations)
  act_heads  attention heads      act_mlp  inner widths (Mamba's E; Sessa keeps widths whole)
  act_vocab  logits' vocabulary
  fb_rows    rows of Sessa's feedback solve, which runs under ``shard_map`` (:func:`spread_rows`):
             by default over ('data', 'fsdp', 'tensor'), so tensor ranks solve different rows
             instead of all solving the same full-width system
Constraints only apply inside ``activation_sharding(mesh, rules)``; with no mesh set the models
are plain single-device code.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping, Optional, Sequence, Union

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MeshAxes = Union[None, str, tuple[str, ...]]

# FSDP shards weights' model-width axis over 'fsdp'; tensor parallelism splits inner widths.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv": "tensor",
    "mlp": "tensor",
    "fb": "tensor",
    "state": None,
    "conv": None,
    "norm": None,
    "layers": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "fb_rows": ("data", "fsdp", "tensor"),
}

# (mesh, rules) while a sharded step is being traced; None elsewhere.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("sessa_activation_sharding",
                                                         default=None)


def logical_to_mesh(spec: Sequence[Optional[str]], rules: Mapping[str, MeshAxes]) -> P:
    """Map one logical spec, e.g. ('embed', 'mlp'), to a mesh PartitionSpec.

    A mesh axis is used at most once per array (later uses become None), as GSPMD requires.
    """
    used: set[str] = set()
    out = []
    for name in spec:
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding rules")
        if axes is None:
            out.append(None)
            continue
        tup = (axes,) if isinstance(axes, str) else tuple(axes)
        tup = tuple(a for a in tup if a not in used)
        used.update(tup)
        out.append(None if not tup else tup[0] if len(tup) == 1 else tup)
    return P(*out)


def tree_logical_to_mesh(logical_specs, rules: Mapping[str, MeshAxes]):
    """Map a pytree of logical PartitionSpecs (from ``nnx.get_partition_spec``) to mesh specs."""
    return jax.tree.map(
        lambda s: logical_to_mesh(tuple(s), rules),
        logical_specs,
        is_leaf=lambda x: isinstance(x, P),
    )


@contextlib.contextmanager
def activation_sharding(mesh, rules: Mapping[str, MeshAxes]):
    """Within this block, :func:`constrain` pins activations to ``mesh`` by ``rules``.

    Enter it inside the function being jitted (it acts at trace time).
    """
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh():
    """(mesh, rules) inside :func:`activation_sharding`, else None (for ops that must place
    kernels under ``shard_map`` themselves, like splash attention)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """``with_sharding_constraint`` by logical names, e.g. ('batch', 'length', 'act_embed');
    the identity outside :func:`activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_mesh(names, rules)))


def _axes(axes: MeshAxes) -> tuple[str, ...]:
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def row_spread(n_rows: int, name: str = "fb_rows") -> Optional[tuple[str, ...]]:
    """The mesh axes that :func:`spread_rows` splits ``n_rows`` rows over, or None when it
    would run the computation as plain code (today's path).

    The axes of ``rules[name]`` (mesh axes of size 1 and ones the mesh lacks left out), less
    trailing axes until their product divides ``n_rows``. None outside
    :func:`activation_sharding`, and when that leaves nothing beyond the 'batch' rule's axes:
    then the rows are split as the activations already are and the axes outside 'batch'
    (tensor) repeat the computation, as before this existed (e.g. 4 rows on data=2 x fsdp=2 x
    tensor=2: 8 row shards do not divide 4).
    """
    active = _ACTIVE.get()
    if active is None:
        return None
    mesh, rules = active
    axes = [a for a in _axes(rules.get(name)) if mesh.shape.get(a, 1) > 1]
    while axes and n_rows % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    batch = {a for a in _axes(rules.get("batch")) if mesh.shape.get(a, 1) > 1}
    return tuple(axes) if set(axes) - batch else None


def spread_rows(fn, *arrays, name: str = "fb_rows", kernel: bool = False):
    """``fn(*arrays)`` for a computation whose rows (leading axis) are independent, with the
    rows split over the mesh axes of ``rules[name]`` (:func:`row_spread`) under
    ``jax.shard_map``: each device runs ``fn`` on its own rows only.

    This is how Sessa's feedback solve uses the tensor axis: its rows are sequential in T but
    independent across the batch, and its width is contracted in the routing scores, so the
    batch is what can be split further. Callers pin the inputs to their ('batch') rows
    first, so that the reshard here is a slice (an all-gather over the extra axes in the
    backward); left free, XLA:TPU chose shardings for the producing projections that gathered
    the global batch on large fsdp meshes (issue 15: 135 GiB a chip on the 7B pod). The
    outputs come back split over those axes; the caller constrains them back. With explicit in/out specs XLA's SPMD
    partitioner never sees a width-split activation here (scripts/repro_spmd_feedback.py: on
    jax 0.10.2 it misplaced rows for one such pattern). Plain ``fn(*arrays)`` where
    :func:`row_spread` gives None.

    ``kernel=True``: ``fn`` holds Mosaic (Pallas TPU) kernels, which XLA cannot partition
    ("Mosaic kernels cannot be automatically partitioned"): where :func:`row_spread` gives
    None it still runs under ``shard_map``, split over the 'batch' rule's axes (the rows'
    existing split), so each device runs the kernels on its own rows.
    """
    axes = row_spread(arrays[0].shape[0], name)
    if axes is None and kernel and _ACTIVE.get() is not None:
        mesh, rules = _ACTIVE.get()
        axes = tuple(a for a in _axes(rules.get("batch")) if mesh.shape.get(a, 1) > 1)
        if not axes or arrays[0].shape[0] % math.prod(mesh.shape[a] for a in axes):
            axes = None
    if axes is None:
        return fn(*arrays)
    mesh, _ = _ACTIVE.get()
    spec = P(axes[0] if len(axes) == 1 else axes)
    arrays = [jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec)) for a in arrays]
    # check_vma=False: the solve's scans start from fresh zero carries, which the varying-axes
    # check would have to be told about; every input and output is split the same way anyway.
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec,
                         check_vma=False)(*arrays)
