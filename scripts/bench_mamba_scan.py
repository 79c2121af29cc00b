#!/usr/bin/env python
"""Forward+backward time of one Mamba block per selective-scan implementation (and chunk size).

    python scripts/bench_mamba_scan.py                          # the ~10M comparison's shape
    python scripts/bench_mamba_scan.py --B 2 --T 64 --reps 2    # a quick CPU check

The Mamba baseline trained ~7x slower than Sessa at the same size in the ~10M MQAR comparison
(RESULTS.md); this measures where a faster setting lies. Shape defaults: the mamba-10m block
(d_model 504, expand 2, d_state 16) at B=64, T=1024, bf16 compute with float32 parameters.
Prints a table and, with --out, writes JSON. Median of --reps timed calls after a warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--T", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=504)
    p.add_argument("--variants", default="sequential,associative,chunked:16,chunked:64,chunked:256",
                   help="scan_impl[:chunk] list")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sessa_jax.models.config import MambaConfig
    from sessa_jax.models.mamba import MambaBlock

    x = jax.random.normal(jax.random.key(0), (args.B, args.T, args.d_model), jnp.bfloat16)
    rows = []
    for v in args.variants.split(","):
        impl, _, chunk = v.partition(":")
        cfg = MambaConfig(d_model=args.d_model, scan_impl=impl,
                          chunk_size=int(chunk) if chunk else 64,
                          dtype="bfloat16", param_dtype="float32")
        block = MambaBlock(cfg, rngs=nnx.Rngs(0))
        gd, params = nnx.split(block)

        def loss(params, x):
            y = nnx.merge(gd, params)(x)
            return jnp.mean(y.astype(jnp.float32) ** 2)

        fn = jax.jit(jax.value_and_grad(loss))
        t0 = time.perf_counter()
        try:
            jax.block_until_ready(fn(params, x))
        except Exception as e:  # e.g. out of memory for the associative scan at large B*T
            rows.append({"variant": v, "error": str(e).splitlines()[0][:200]})
            print(f"{v:>14}: failed: {rows[-1]['error']}", flush=True)
            continue
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(fn(params, x))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        rows.append({"variant": v, "fwd_bwd_ms": ms, "compile_s": compile_s,
                     "tokens_per_sec": args.B * args.T / ms * 1e3})
        print(f"{v:>14}: {ms:9.2f} ms fwd+bwd  ({rows[-1]['tokens_per_sec']:,.0f} tokens/s, "
              f"compile {compile_s:.1f} s)", flush=True)

    dev = jax.devices()[0].device_kind
    print(f"\none Mamba block, d_model {args.d_model}, B={args.B}, T={args.T}, bf16, on {dev}")
    print("| scan | fwd+bwd ms | tokens/s |\n|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed | |")
        else:
            print(f"| {r['variant']} | {r['fwd_bwd_ms']:.2f} | {r['tokens_per_sec']:,.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "device": dev,
                       "jax": jax.__version__, "B": args.B, "T": args.T,
                       "d_model": args.d_model, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
