#!/usr/bin/env python
"""Minimal repro of the XLA SPMD wrong-output case behind Sessa's whole-width activations.

    python scripts/repro_spmd_feedback.py            # ~30 s on a 2-core CPU host

Finding (jax 0.10.2 / jaxlib 0.10.2, CPU, 8 host devices, 2026-12-02): it is NOT the feedback
solve. Two matmuls and one sharding constraint suffice:

    mesh (data=2, fsdp=2, tensor=2)
    x (B, T, d)  sharded P(('data', 'fsdp'))            rows, like the activations
    A (d, d)     sharded P('fsdp', 'tensor')            like an ('embed', 'heads') weight
    Bm (d, d)    sharded P('tensor', 'fsdp')            like out_proj, ('heads', 'embed')
    jit(lambda x, A, Bm: wsc(x @ A @ Bm, P(('data', 'fsdp'), None, 'tensor')))

returns rows in the wrong places: the partitioned HLO moves the intermediate x @ A with a
collective-permute {2->4, 4->2, 3->5, 5->3} (it swaps the data and fsdp coordinates of the
batch shards, seemingly to line the rows up with Bm's fsdp-split columns) and never
permutes back, so the output equals the true result with batch shards 1 and 2 exchanged
(checked below: error ~scale against the truth, ~1e-6 against the truth with those shards
swapped). GSPMD propagation (JAX_USE_SHARDY_PARTITIONER=0) and Shardy give the same wrong
result, so the bug is in XLA's SPMD partitioner (dot handling) rather than in either
propagation. It needs all three mesh axes > 1: meshes 1x2x4, 2x1x4, 1x2x2, 2x1x2 are
right. Constraining the intermediate to rows (P(('data','fsdp'))) or the output to
whole-width rows hides it, and so does what spread_rows asks for: the output as rows over
data x fsdp x tensor (8 rows; checked at d=16 and 32).

In the Sessa layer this is the forward branch's out_proj feeding the width-split f
constraint (f = merge_heads(o) with out_proj sharded ('heads', 'embed')); the old comment's
"every intermediate matched when returned alone" is the same thing: what is returned changes
what the partitioner picks. The layer is wrong even with the feedback solve replaced by the
identity (s = f), and for both feedback impls; with f constrained to whole-width rows (what
models/sessa.py does) it is right. A TPU AOT compile of the same 2-matmul program
(v5p:2x2x2, libtpu 0.0.42.1) takes a different plan (a windowed einsum looping over a tensor
collective-permute, no data/fsdp swap); it could not be run here, so whether TPU is affected
is unknown.

What follows from it (models/sessa.py, models/partitioning.py ``spread_rows``): no
width-split activation is pinned between the projections and the solve; the solve's rows are
spread over the tensor axis too, inside ``jax.shard_map`` with explicit in/out specs, so the
partitioner only moves whole rows there.

Exit status 0 when the minimal case reproduces (prints REPRODUCES), 1 when it does not.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

AXES = ("data", "fsdp", "tensor")
ROWS = P(("data", "fsdp"))
WIDTH = P(("data", "fsdp"), None, "tensor")
SPREAD = P(("data", "fsdp", "tensor"))


def two_matmuls(shape, *, out_spec=WIDTH, mid_spec=None, B=4, T=2, d=16, seed=0):
    """max |sharded - float64 truth|, the same against truth with batch shards 1, 2 swapped,
    and the scale."""
    devs = jax.devices()[: int(np.prod(shape))]
    mesh = Mesh(np.asarray(devs).reshape(shape), AXES)
    r = np.random.default_rng(seed)
    x, A, Bm = (r.standard_normal(s).astype(np.float32) for s in ((B, T, d), (d, d), (d, d)))
    wsc = lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, s))

    def fn(x, A, Bm):
        h = x @ A
        if mid_spec is not None:
            h = wsc(h, mid_spec)
        return wsc(h @ Bm, out_spec)

    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
    got = np.asarray(jax.jit(fn)(put(x, ROWS), put(A, P("fsdp", "tensor")),
                                 put(Bm, P("tensor", "fsdp"))))
    want = np.einsum("btd,de,ef->btf", x.astype(np.float64), A, Bm)
    swapped = want[[0, 2, 1, 3]] if B == 4 else want  # (B=8: no swap to compare with)
    return (float(np.max(np.abs(got - want))), float(np.max(np.abs(got - swapped))),
            float(np.max(np.abs(want))))


def sessa_layer(width_split_f: bool, identity_solve: bool, impl: str = "chunked") -> float:
    """max |constrained - unconstrained| of one Sessa layer on the 2x2x2 mesh, with f (the
    forward branch's output) constrained to whole-width rows or to a tensor-split width."""
    from flax import nnx

    import sessa_jax.models.sessa as sessa
    from sessa_jax.models import SessaLayer
    from sessa_jax.models.config import SessaConfig
    from sessa_jax.models.partitioning import (
        DEFAULT_RULES, activation_sharding, constrain, tree_logical_to_mesh,
    )

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), AXES)
    cfg = SessaConfig(d_model=32, n_heads=4, n_kv_heads=2, chunk_size=4, feedback_impl=impl)
    with jax.set_mesh(mesh):
        layer = SessaLayer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    specs = tree_logical_to_mesh(nnx.get_partition_spec(state), DEFAULT_RULES)
    placed = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                                is_leaf=lambda s: isinstance(s, P)))
    x = jax.random.normal(jax.random.key(1), (4, 8, 32))
    saved = sessa.SessaMixer.attend, sessa.feedback_solve

    def attend(self, a, *, return_kv=False, **kw):  # the forward branch, f width-split
        f, kv = saved[0](self, a, return_kv=True, **kw)
        if width_split_f:
            f = constrain(f, ("batch", "length", "act_mlp"))
        return (f, kv) if return_kv else f

    try:
        sessa.SessaMixer.attend = attend
        if identity_solve:
            sessa.feedback_solve = lambda q, k, g, f, **kw: f
        want = layer(x)

        def constrained(st, x):
            with activation_sharding(mesh, DEFAULT_RULES):
                return nnx.merge(graphdef, st)(x)

        with jax.set_mesh(mesh):
            got = jax.jit(constrained)(placed, jax.device_put(x, NamedSharding(mesh, ROWS)))
    finally:
        sessa.SessaMixer.attend, sessa.feedback_solve = saved
    return float(jnp.max(jnp.abs(got - want)))


def main() -> int:
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, backend {jax.default_backend()}, "
          f"shardy={jax.config.jax_use_shardy_partitioner}, {len(jax.devices())} devices")
    print("\nwsc(x @ A @ Bm, P(('data','fsdp'), None, 'tensor')); A ('fsdp','tensor'), "
          "Bm ('tensor','fsdp'), x (4, 2, 16) rows")
    print(f"{'mesh data x fsdp x tensor':28s} {'variant':34s} {'|err|':>9s} {'|err| swapped':>14s}"
          f" {'scale':>7s}")
    cases = [
        ((2, 2, 2), "as above", {}),
        ((2, 2, 2), "output whole-width rows", dict(out_spec=ROWS)),
        ((2, 2, 2), "x @ A constrained to rows", dict(mid_spec=ROWS)),
        # what spread_rows asks of the forward branch's output: rows over all three axes
        ((2, 2, 2), "8 rows, output rows over d,f,t", dict(out_spec=SPREAD, B=8)),
        ((2, 2, 2), "8 rows, d=32, out rows over d,f,t", dict(out_spec=SPREAD, B=8, d=32)),
        ((1, 2, 4), "as above", {}),
        ((2, 1, 4), "as above", {}),
        ((1, 2, 2), "as above", {}),
        ((2, 1, 2), "as above", {}),
    ]
    minimal = None
    for shape, name, kw in cases:
        err, err_sw, scale = two_matmuls(shape, **kw)
        minimal = err / scale if minimal is None else minimal
        print(f"{' x '.join(map(str, shape)):28s} {name:34s} {err:9.3g} {err_sw:14.3g} "
              f"{scale:7.3g}")
    print("\nOne Sessa layer on 2x2x2, constrained vs unconstrained (f = forward-branch output):")
    for split in (False, True):
        for ident in (True, False):
            err = sessa_layer(split, ident)
            print(f"  f {'width-split over tensor' if split else 'whole-width rows      '}  "
                  f"solve {'identity (s = f)' if ident else 'chunked         '}  |err| {err:.3g}")
    ok = minimal > 1e-3
    print("\nREPRODUCES" if ok else "\ndoes not reproduce", f"(minimal case: |err| / scale = "
          f"{minimal:.3g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
