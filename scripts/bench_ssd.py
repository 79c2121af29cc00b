#!/usr/bin/env python
"""Forward+backward time of one Mamba-2 (SSD) block against a Mamba-1 and an attention block.

    python scripts/bench_ssd.py                                  # D=768, T=2048, B=8 (GPU)
    python scripts/bench_ssd.py --variants mamba2:64,mamba2:128,mamba2:256,ssd:128
    python scripts/bench_ssd.py --B 1 --T 64 --d-model 64 --reps 2    # a quick CPU check

Variants: ``attention`` (the Transformer's block, heads of 64), ``mamba`` (the Mamba-1 block,
its default chunked selective scan), ``mamba2:Q`` (the Mamba-2 block, SSD chunk Q), ``ssd:Q``
(the SSD op alone on the block's shapes: where the block's time goes). bf16 compute, float32
parameters; the median of --reps timed calls after a warm-up. Each variant runs in its own
process, so its peak memory is its own and an out-of-memory failure stays contained.

Prints a markdown table (one row per variant, tokens/s and the ratio to attention) and writes
JSON to --out, or to $OUT/bench_ssd.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time


def _measure(args) -> dict:
    """One variant in this process -> a result dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sessa_jax.models import (
        AttentionBlock, AttentionConfig, Mamba2Block, Mamba2Config, MambaBlock, MambaConfig,
    )
    from sessa_jax.ops.ssd import ssd_chunked

    B, T, D = args.B, args.T, args.d_model
    kind, _, q = args.one.partition(":")
    Q = int(q) if q else 128
    res = dict(variant=args.one, B=B, T=T, D=D, device=str(jax.devices()[0].device_kind),
               backend=jax.default_backend(), jax=jax.__version__)
    bf = jnp.bfloat16
    m2 = Mamba2Config(d_model=D, d_state=args.d_state, head_dim=args.head_dim, chunk_size=Q,
                      dtype="bfloat16")
    if kind == "ssd":
        H, P, N = m2.n_heads, m2.head_dim, m2.d_state
        ks = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(ks[0], (B, T, H, P), bf)
        dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, H), jnp.float32) - 3.0)
        A = -jnp.exp(jax.random.normal(ks[2], (H,), jnp.float32))
        Bm = jax.random.normal(ks[3], (B, T, 1, N), bf)
        Cm = jax.random.normal(ks[4], (B, T, 1, N), bf)

        def loss(x, dt, A, Bm, Cm):
            y, _ = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=Q)
            return jnp.mean(y ** 2)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        inputs = (x, dt, A, Bm, Cm)
        res.update(H=H, P=P, N=N, chunk=Q)
    else:
        if kind == "attention":
            block = AttentionBlock(AttentionConfig(d_model=D, n_heads=max(1, D // 64),
                                                   dtype="bfloat16"), rngs=nnx.Rngs(0))
        elif kind == "mamba":
            block = MambaBlock(MambaConfig(d_model=D, dtype="bfloat16"), rngs=nnx.Rngs(0))
        elif kind == "mamba2":
            block = Mamba2Block(m2, rngs=nnx.Rngs(0))
            res.update(H=m2.n_heads, P=m2.head_dim, N=m2.d_state, chunk=Q)
        else:
            raise SystemExit(f"unknown variant {args.one!r}")
        graphdef, params = nnx.split(block)
        x = jax.random.normal(jax.random.key(0), (B, T, D), bf)

        def loss(params, x):
            y = nnx.merge(graphdef, params)(x)
            return jnp.mean(y.astype(jnp.float32) ** 2)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        inputs = (params, x)
        res["params"] = int(sum(v.size for v in jax.tree.leaves(params)))

    t0 = time.perf_counter()
    compiled = fn.lower(*inputs).compile()
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append((time.perf_counter() - t0) * 1e3)
    res["fwd_bwd_ms"] = round(statistics.median(times), 3)
    res["fwd_bwd_ms_spread"] = round(max(times) - min(times), 3)
    res["tokens_per_s"] = round(B * T / (res["fwd_bwd_ms"] / 1e3))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        res["peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 3)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--d-state", type=int, default=128, help="Mamba-2 N")
    p.add_argument("--head-dim", type=int, default=64, help="Mamba-2 P")
    p.add_argument("--variants", default="attention,mamba,mamba2:64,mamba2:128,mamba2:256,ssd:128")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/bench_ssd.json if set)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one variant
    args = p.parse_args(argv)

    if args.one:
        print("RESULT " + json.dumps(_measure(args)), flush=True)
        return 0

    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", v, "--B", str(args.B),
               "--T", str(args.T), "--d-model", str(args.d_model), "--d-state",
               str(args.d_state), "--head-dim", str(args.head_dim), "--reps", str(args.reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not got:
            err = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
            rows.append({"variant": v, "error": err})
            print(f"{v:>12}: failed: {err}", flush=True)
            continue
        rows.append(json.loads(got[-1][len("RESULT "):]))
        r = rows[-1]
        print(f"{v:>12}: {r['fwd_bwd_ms']:9.2f} ms fwd+bwd ({r['tokens_per_s']:,} tokens/s, "
              f"compile {r['compile_s']} s, peak {r.get('peak_gib', '?')} GiB)", flush=True)

    base = next((r for r in rows if r["variant"] == "attention" and "error" not in r), None)
    dev = next((r["device"] for r in rows if "device" in r), "?")
    print(f"\none block, d_model {args.d_model}, B={args.B}, T={args.T}, bf16, on {dev}; "
          f"Mamba-2: N={args.d_state}, P={args.head_dim}")
    print("| variant | fwd+bwd ms | tokens/s | vs attention | peak GiB | compile s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][:60]} | | | | |")
            continue
        rel = f"{base['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if base else "-"
        print(f"| {r['variant']} | {r['fwd_bwd_ms']:.2f} | {r['tokens_per_s']:,} | {rel} | "
              f"{r.get('peak_gib', '-')} | {r['compile_s']} |")

    out = args.out or (os.path.join(os.environ["OUT"], "bench_ssd.json")
                       if os.environ.get("OUT") else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "B": args.B, "T": args.T,
                       "d_model": args.d_model, "d_state": args.d_state,
                       "head_dim": args.head_dim, "reps": args.reps, "results": rows}, f, indent=1)
        print(f"wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
