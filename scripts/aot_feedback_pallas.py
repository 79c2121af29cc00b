#!/usr/bin/env python
"""Ahead-of-time TPU compile of ``feedback_impl="pallas"`` (fwd+bwd) from a CPU host: checks
that the Pallas kernels lower through Mosaic, and prints their memory analysis.

    python scripts/aot_feedback_pallas.py                       # v5e:2x2, T=2048, D=768, c=512
    python scripts/aot_feedback_pallas.py --topology v6e:2x2 --T 8192 --D 2048 --c 256 --seg

Needs libtpu (pip install 'sessa_jax[tpu]'); exit 0 when every case compiles, 1 otherwise,
3 without libtpu/topology.
"""
import argparse
import os
import sys
import time

GEN_PREFIX = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--c", type=int, default=512)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--seg", action="store_true", help="also with segment ids")
    args = p.parse_args()

    gen, shape = args.topology.split(":")
    chips = 1
    for x in shape.split("x"):
        chips *= int(x)
    cores = chips * (2 if gen in ("v4", "v5p") else 1)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{GEN_PREFIX.get(gen, gen)}-{cores}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    try:
        from jax.experimental import topologies
        dev = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices[0]
    except Exception as e:
        print(f"aot_feedback_pallas: no TPU topology {args.topology!r}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 3
    from sessa_jax.ops.feedback_pallas import feedback_pallas

    sh = SingleDeviceSharding(dev)
    B, T, D = args.B, args.T, args.D
    bad = 0
    for dt in args.dtypes.split(","):
        for seg in ([False, True] if args.seg else [False]):
            dtype = jnp.dtype(dt)

            def loss(q, k, g, f, ids):
                s = feedback_pallas(q, k, g, f, chunk_size=args.c, block=args.block,
                                    segment_ids=ids if seg else None)
                return jnp.mean(s.astype(jnp.float32) ** 2)

            x = jax.ShapeDtypeStruct((B, T, D), dtype, sharding=sh)
            g = jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=sh)
            ids = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh)
            t0 = time.perf_counter()
            try:
                comp = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(
                    x, x, g, x, ids).compile()
                mem = comp.memory_analysis()
                print(f"OK  {args.topology} {dt} seg={seg} B={B} T={T} D={D} c={args.c}: "
                      f"compiled in {time.perf_counter() - t0:.1f}s, temp "
                      f"{getattr(mem, 'temp_size_in_bytes', 0) / 2**20:.1f} MiB", flush=True)
            except Exception as e:  # report every case
                bad += 1
                msg = str(e).splitlines()
                print(f"FAIL {args.topology} {dt} seg={seg}: {type(e).__name__}: "
                      f"{' | '.join(msg[:6])}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
