#!/usr/bin/env python
"""Per-chip FLOPs of Sessa's feedback solve under tensor parallelism, compiled ahead of time.

    python scripts/aot_feedback_flops.py                       # the 7B pod config, v5p:2x2x1
    python scripts/aot_feedback_flops.py --parts solve,layer \
        --json benchmarks/aot/feedback_flops_7b.json

A full pod compile of the 7B config takes ~20 minutes on a 2-core host, so this compiles the
piece that tensor parallelism changes: the feedback solve (forward + backward, the exact code
path of ``SessaMixer.__call__``: row_spread / spread_rows) at the pod config's width, length,
chunking and dtype, with the pod's rows per (data x fsdp) shard, on a small TPU slice whose
mesh is (data=1, fsdp=1, tensor=<the config's tensor>). The pod's 256 chips are 64 such
groups of 4 with identical work, so per-chip FLOPs here are per-chip FLOPs there.

Three compiles (XLA:TPU cost analysis, per chip):
  * ideal: one chip solving its share of rows alone (global rows / chips; 1 for the 7B pod);
  * before: the tensor ranks all solving their group's rows (``fb_rows`` rule off);
  * after: the rows spread over tensor too (the default rules).
Each is compared with the analytic count: the matmul FLOPs of the chunked algorithm as it is
configured (chunks, segments, causal skipping, block inverses; ``chunked_flops`` below) and
the MFU convention of ``sessa_jax.train.metrics.flops_per_token`` (feedback 12 T D per token,
PaLM-style, no causal halving). ``--parts layer`` compiles one whole Sessa layer (jit(grad),
block remat as remat=full) before and after instead (``solve,layer``: both). Needs libtpu;
exit 3 without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from aot_compile import CHIPS, parse_topology  # noqa: E402  (sibling script)


def _env(gen: str, chips: int) -> None:
    cores = chips * (2 if gen in ("v4", "v5p") else 1)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{CHIPS[gen][1]}-{cores}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _inverse_flops(c: int, inverse: str, base: int = 64) -> float:
    """Matmul FLOPs of inverting one c x c diagonal block (ops/feedback.py _block_inverse)."""
    def doubling(n):  # N^2, then (levels - 2) products of [p; x] (2n x n) by p, then x p
        levels = math.ceil(math.log2(n)) if n > 1 else 0
        return 0 if levels < 2 else 2 * n ** 3 * (1 + 2 * (levels - 2) + 1)

    if inverse == "solve":
        return c ** 3  # a triangular solve against I: ~c^3 / 3 MACs (XLA may count it otherwise)
    if inverse == "doubling" or c <= base:
        return doubling(c)
    cp = base * 2 ** math.ceil(math.log2(c / base))
    fl, size = (cp // base) * doubling(base), base
    while size < cp:
        fl += (cp // (2 * size)) * 2 * (2 * size ** 3)  # two size^3 products per merged pair
        size *= 2
    return fl


def chunked_flops(B: int, T: int, D: int, *, chunk: int, segments: int, unroll: int,
                  inverse: str) -> dict:
    """Matmul FLOPs of feedback_chunked's forward and backward (ops/feedback.py), per call."""
    c = max(1, min(chunk, T))
    tp = -(-T // c) * c
    n = tp // c
    nseg = n if n <= unroll else max(1, min(segments, n // 2))
    edges = [round(n * i / nseg) for i in range(nseg + 1)]
    fwd = bwd = once = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        kp, rows = b * c, tp - a * c
        # scores, cross (c x kp each); block inverse; inv @ rhs and A_cc @ s (c x c)
        f1 = 2 * (2 * c * kp * D) + _inverse_flops(c, inverse) + 2 * (2 * c * c * D)
        # scores^T, alpha^T d_o, s . d_o, dk, dq (c x rows each); inv^T @ rhs
        b1 = 5 * (2 * c * rows * D) + 2 * c * c * D
        fwd, bwd, once = fwd + (b - a) * f1, bwd + (b - a) * b1, once + f1 + b1
    # XLA's cost analysis counts a while loop's body once, whatever its trip count: a segment
    # of several chunks (one lax.scan) shows up as one chunk's FLOPs ("counted_once").
    return {"forward": B * fwd, "backward": B * bwd, "total": B * (fwd + bwd),
            "counted_once": B * once}


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", 0.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/pods/sessa-7b-v5p-512.yaml")
    p.add_argument("--pod-chips", type=int, default=256, help="chips of the config's slice")
    p.add_argument("--topology", default=None,
                   help="TPU slice with <mesh.tensor> chips (default v5p:2x2x1 for tensor=4)")
    p.add_argument("--parts", default="solve",
                   help="comma list: solve (three solve compiles), layer (two layer compiles)")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)

    import yaml

    tensor = int(yaml.safe_load(open(args.config))["mesh"]["tensor"])
    topology = args.topology or {2: "v5p:2x1x1", 4: "v5p:2x2x1", 8: "v5p:2x2x2"}[tensor]
    gen, chips = parse_topology(topology)
    _env(gen, chips)

    import jax
    import jax.numpy as jnp
    import jaxlib
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

    from sessa_jax.models.partitioning import (
        DEFAULT_RULES, activation_sharding, constrain, row_spread, spread_rows,
    )
    from sessa_jax.ops.feedback import feedback_solve
    from sessa_jax.train.config import load_config
    from sessa_jax.train.metrics import flops_per_token

    cfg = load_config(args.config, args.overrides)
    m = cfg.model
    G, T, D = cfg.run.global_batch_size, cfg.data.seq_len, m.d_model
    groups = args.pod_chips // tensor  # data x fsdp shards of the pod
    rows = G // groups  # rows of one (data x fsdp) shard: what `tensor` chips share
    ideal_rows = G / args.pod_chips
    try:
        from jax.experimental import topologies
        devices = list(topologies.get_topology_desc(topology_name=topology,
                                                    platform="tpu").devices)
    except Exception as e:
        print(f"aot_feedback_flops: cannot get TPU topology {topology!r}: {e}", file=sys.stderr)
        return 3
    assert len(devices) == tensor, (topology, len(devices), tensor)
    mesh = Mesh(np.asarray(devices).reshape(1, 1, tensor), ("data", "fsdp", "tensor"))
    dt = jnp.dtype(m.dtype)
    solve = lambda q, k, g, f: feedback_solve(
        q, k, g, f, impl=m.feedback_impl, chunk_size=m.chunk_size,
        segments=m.feedback_segments, inverse=m.feedback_inverse, unroll=m.feedback_unroll)
    rows_names = ("batch", "length", None)

    def mixer_solve(q, k, g, f):  # SessaMixer.__call__'s solve, inputs from the projections
        spread = row_spread(q.shape[0]) is not None
        q, k, f = (constrain(a, rows_names) for a in (q, k, f))  # pinned either way (issue 15)
        g = constrain(g, rows_names[:2])
        s = spread_rows(solve, q, k, g, f)
        return constrain(s, rows_names) if spread else s

    def grad_fn(rules):
        def loss(q, k, g, f, ct):
            if rules is None:
                s = solve(q, k, g, f)
            else:
                with activation_sharding(mesh, rules):
                    s = mixer_solve(q, k, g, f)
            return jnp.sum(s.astype(jnp.float32) * ct.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))

    def inputs(B, sharded):
        if sharded:  # as the projections leave them: width split over tensor
            w = NamedSharding(mesh, P(None, None, "tensor"))
            r = NamedSharding(mesh, P())
        else:
            w = r = SingleDeviceSharding(devices[0])
        sds = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
        return (sds((B, T, D), dt, w), sds((B, T, D), dt, w), sds((B, T), jnp.float32, r),
                sds((B, T, D), dt, w), sds((B, T, D), dt, w))

    kw = dict(chunk=m.chunk_size, segments=m.feedback_segments, unroll=m.feedback_unroll,
              inverse=m.feedback_inverse)
    one = chunked_flops(1, T, D, **kw)
    one_row, one_row_counted = one["total"], one["counted_once"]
    fb_ptok = (flops_per_token(m, T, n_params=0)
               - flops_per_token(dataclasses.replace(m, family="transformer"), T, n_params=0)
               ) / m.n_layers  # the feedback's share of the Sessa mixing term: 12 T D
    try:
        from importlib.metadata import version
        libtpu = version("libtpu")
    except Exception:
        libtpu = "?"
    print(f"jax {jax.__version__} (jaxlib {jaxlib.__version__}, libtpu {libtpu}), {topology}: "
          f"{len(devices)} x "
          f"{devices[0].device_kind}; {args.config}: D={D}, T={T}, global batch {G} on "
          f"{args.pod_chips} chips, tensor={tensor} -> {rows} rows per tensor group, "
          f"{ideal_rows:g} per chip ideally; {m.dtype}, chunk {m.chunk_size}, segments "
          f"{m.feedback_segments}, unroll {m.feedback_unroll}, inverse {m.feedback_inverse}")
    print(f"analytic, one row: chunked algorithm {one_row:.4g} FLOPs (fwd+bwd; "
          f"{one_row_counted:.4g}"
          f" with each scan body counted once, as XLA's cost analysis does); metrics "
          f"convention 12 T D x T = {fb_ptok * T:.4g}")

    runs = [("ideal (1 chip, its own rows)", max(1, round(ideal_rows)), None, False),
            ("before (fb_rows off: tensor ranks repeat)", rows,
             dict(DEFAULT_RULES, fb_rows=None), True),
            ("after (rows over tensor too)", rows, dict(DEFAULT_RULES), True)]
    parts = set(args.parts.split(","))
    recs = []
    for name, B, rules, sharded in (runs if "solve" in parts else []):
        fn = grad_fn(rules)
        t0 = time.time()
        if sharded:
            with jax.set_mesh(mesh):
                lowered = fn.lower(*inputs(B, sharded))
        else:
            lowered = fn.lower(*inputs(B, sharded))
        compiled = lowered.compile()
        fl = _flops(compiled)
        hlo = lowered.as_text()
        rec = {"name": name, "rows": B, "flops_per_chip": fl, "compile_sec": time.time() - t0,
               "shard_map": hlo.count("manual_computation") + hlo.count("shard_map"),
               "vs_ideal_analytic": fl / (ideal_rows * one_row),
               "vs_ideal_analytic_counted_once": fl / (ideal_rows * one_row_counted),
               "vs_metrics_convention": fl / (ideal_rows * fb_ptok * T)}
        recs.append(rec)
        print(f"{name:44s} {fl:.4g} FLOPs/chip = {rec['vs_ideal_analytic_counted_once']:.3f}x "
              f"the ideal's analytic count as XLA counts loops ({rec['vs_ideal_analytic']:.3f}x "
              f"the true count, {rec['vs_metrics_convention']:.3f}x the metrics' 12 T D); "
              f"compiled in {rec['compile_sec']:.0f}s")
    ideal = recs[0]["flops_per_chip"] if recs else 0.0
    for r in recs:
        r["vs_ideal_compiled"] = r["flops_per_chip"] / (ideal / max(1, round(ideal_rows))
                                                        * ideal_rows)
    if recs:
        own = ideal / max(1, round(ideal_rows))
        print(f"cost analysis / analytic for one chip's own rows: {own / one_row_counted:.4f} "
              f"(loop bodies once), {own / one_row:.4f} (true count); per-chip FLOPs vs the "
              f"compiled ideal: before {recs[1]['vs_ideal_compiled']:.3f}x, after "
              f"{recs[2]['vs_ideal_compiled']:.3f}x (target <= 1.1x)")

    def write_json(recs, layer):
        if not args.json:
            return
        import datetime
        out = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
               "jaxlib": jaxlib.__version__, "libtpu": libtpu, "topology": topology,
               "config": args.config, "overrides": args.overrides, "d_model": D, "seq_len": T,
               "global_batch": G, "pod_chips": args.pod_chips, "tensor": tensor,
               "rows_per_group": rows, "analytic_one_row": one_row,
               "analytic_one_row_counted_once": one_row_counted,
               "metrics_one_row": fb_ptok * T, "solve": recs, "layer": layer}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    layer = []
    write_json(recs, layer)  # the solve's figures, before the (slower) layer compiles
    if "layer" in parts:
        from flax import nnx

        from sessa_jax.models import SessaLayer

        scfg = m.block_config()
        lyr = nnx.eval_shape(lambda: SessaLayer(scfg, rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(lyr)
        from sessa_jax.models.partitioning import tree_logical_to_mesh
        specs = tree_logical_to_mesh(nnx.get_partition_spec(params), DEFAULT_RULES)
        abs_params = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
            params, specs, is_leaf=lambda x: isinstance(x, P))
        x = jax.ShapeDtypeStruct((rows, T, D), dt, sharding=NamedSharding(mesh, P()))
        for name, rules in (("layer before", dict(DEFAULT_RULES, fb_rows=None)),
                            ("layer after", dict(DEFAULT_RULES))):
            def loss(p, x, rules=rules):
                with activation_sharding(mesh, rules):
                    y = jax.checkpoint(lambda p, x: nnx.merge(graphdef, p)(x))(p, x)
                return jnp.sum(y.astype(jnp.float32) ** 2)
            t0 = time.time()
            # No set_mesh here: splash builds its mask tables eagerly, which fails against the
            # topology's devices; the arguments' NamedShardings carry the mesh.
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(abs_params, x).compile()
            fl = _flops(compiled)
            layer.append({"name": name, "flops_per_chip": fl, "compile_sec": time.time() - t0})
            print(f"{name:44s} {fl:.4g} FLOPs/chip (whole layer, remat); compiled in "
                  f"{time.time() - t0:.0f}s")
        before, after = (r["flops_per_chip"] for r in layer)
        print(f"layer: after / before = {after / before:.3f}; saved {before - after:.4g} "
              "FLOPs/chip")

    write_json(recs, layer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
