#!/usr/bin/env python
"""One layer's training-step memory on ONE TPU chip, compiled ahead of time, for several lengths.

    python scripts/aot_layer.py --topology v5e:2x2 --lengths 8192,32768,131072
    python scripts/aot_layer.py --block transformer --attention-impl xla --lengths 8192,32768

Compiles ``jit(grad)`` of one block (D, heads, dtype as given; B=1 by default) for the first
chip of the topology (libtpu's topology API, no TPU needed) and prints, per length, XLA's
per-chip temporaries, arguments and total against the chip's HBM, and how temporaries grow
between consecutive lengths. A compile that does not fit is reported with the figure XLA gives.
``--block feedback`` compiles the feedback solve alone. Exit 0 when every length fits, 1 if
one does not, 3 without libtpu.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from aot_compile import CHIPS, GiB, parse_topology  # noqa: E402  (sibling script)


def _env(gen: str, chips: int) -> None:
    acc_prefix = CHIPS[gen][1]
    cores = chips * (2 if gen in ("v4", "v5p") else 1)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{acc_prefix}-{cores}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def compile_one(args, T: int, device):
    """Lower and compile jit(grad) of the block at length T on ``device``; returns figures."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    from sessa_jax.models import AttentionBlock, SessaLayer
    from sessa_jax.models.config import AttentionConfig, SessaConfig
    from sessa_jax.ops.feedback import feedback_solve

    dt = jnp.dtype(args.dtype)
    sh = SingleDeviceSharding(device)
    B, D = args.batch, args.d_model
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    if args.block == "feedback":
        def loss(q, k, g, f):
            s = feedback_solve(q, k, g, f, impl=args.feedback_impl, chunk_size=args.chunk,
                               segments=args.segments)
            return jnp.sum(s.astype(jnp.float32) ** 2)

        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        ins = (sds((B, T, D), dt), sds((B, T, D), dt), sds((B, T), jnp.float32),
               sds((B, T, D), dt))
    else:
        kw = dict(d_model=D, n_heads=args.heads, attention_impl=args.attention_impl,
                  dtype=args.dtype, param_dtype="float32")
        if args.block == "sessa":
            layer = nnx.eval_shape(lambda: SessaLayer(
                SessaConfig(**kw, feedback_impl=args.feedback_impl, chunk_size=args.chunk,
                            feedback_segments=args.segments),
                rngs=nnx.Rngs(0)))
        else:
            layer = nnx.eval_shape(lambda: AttentionBlock(AttentionConfig(**kw),
                                                          rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(layer)

        def loss(params, x):
            m = nnx.merge(graphdef, params)
            return jnp.sum(m(x).astype(jnp.float32) ** 2)

        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        abs_params = jax.tree.map(lambda a: sds(a.shape, a.dtype), params)
        ins = (abs_params, sds((B, T, D), dt))
    t0 = time.time()
    lowered = fn.lower(*ins)
    hlo = lowered.as_text()
    rec = {"T": T, "splash": "tpu_custom_call" in hlo or "splash" in hlo}
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses programs that exceed HBM
        msg = str(e)
        m = re.search(r"Used\s+([0-9.]+)([KMGT])?\s+of\s+([0-9.]+)([KMGT])?\s+hbm", msg)
        t = re.search(r"temporaries \(([0-9.]+)([KMGT])?\)", msg)
        if not (m or "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg):
            raise
        unit = {"K": 2 ** 10, "M": 2 ** 20, "G": GiB, "T": 2 ** 40, None: 1}
        rec.update(fits=False, compile_sec=time.time() - t0,
                   total=float(m.group(1)) * unit[m.group(2)] if m else None,
                   temporary=float(t.group(1)) * unit[t.group(2)] if t else None,
                   error=msg.splitlines()[0][:300])
        return rec
    ma = compiled.memory_analysis()
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
             + ma.temp_size_in_bytes)
    rec.update(fits=True, compile_sec=time.time() - t0, temporary=ma.temp_size_in_bytes,
               arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
               total=total)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5e:2x2", help="TPU slice whose first chip is used")
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--block", choices=("sessa", "transformer", "feedback"), default="sessa")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--feedback-impl", default="chunked")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--segments", type=int, default=8,
                   help="scans the looped chunk sweep is split into (fewer: less to compile)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    gen, chips = parse_topology(args.topology)
    hbm = CHIPS[gen][0] * GiB
    _env(gen, chips)
    try:
        from jax.experimental import topologies
        dev = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices[0]
    except Exception as e:
        print(f"aot_layer: cannot get TPU topology {args.topology!r}: {type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''} (needs libtpu: pip install "
              "'sessa_jax[tpu]')", file=sys.stderr)
        return 3
    lengths = [int(x) for x in args.lengths.split(",") if x]
    print(f"{args.block} block, D={args.d_model}, {args.heads} heads, B={args.batch}, "
          f"{args.dtype}, attention_impl={args.attention_impl}, feedback={args.feedback_impl}/"
          f"{args.chunk}; jit(grad) on one {dev.device_kind} ({hbm / GiB:.0f} GiB HBM)")
    print(f"{'T':>8} {'temporary':>12} {'total':>12} {'growth':>7}  fits  splash  compile")
    recs, prev, ok = [], None, True
    for T in lengths:
        r = compile_one(args, T, dev)
        r["fits"] = bool(r["fits"] and r["total"] is not None and r["total"] <= hbm)
        ok &= r["fits"]
        tmp = r.get("temporary")
        growth = f"{tmp / prev:.2f}x" if tmp and prev else ""
        prev = tmp
        g = lambda b: f"{b / GiB:.3f} GiB" if b is not None else "?"
        print(f"{T:>8} {g(tmp):>12} {g(r.get('total')):>12} {growth:>7}  "
              f"{'yes' if r['fits'] else 'NO ':>4}  {'yes' if r['splash'] else 'no':>6}  "
              f"{r['compile_sec']:.0f}s" + (f"  ({r['error']})" if "error" in r else ""),
              flush=True)
        recs.append(r)
    if args.json:
        import datetime

        import jax
        out = {"date": datetime.date.today().isoformat(), "topology": args.topology,
               "device": dev.device_kind, "hbm_bytes": hbm, "args": vars(args),
               "jax": jax.__version__, "results": recs}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
