#!/usr/bin/env python
"""Benchmark one Sessa layer (dense, chunked and pallas feedback) against a same-width attention layer.

Forward+backward time and peak device memory at a fixed number of tokens per step, bf16
compute with float32 parameters, plus single-token decode speed at long contexts.

    python scripts/bench_layer.py                       # the full sweep (GPU)
    python scripts/bench_layer.py --T 512,2048 --reps 3 # a quick one
    python scripts/bench_layer.py --out bench.json --markdown
    python scripts/bench_layer.py --impls feedback --inverse doubling --segments 16  # variants
    python scripts/bench_layer.py --impls attention,chunked --T 1048576 --tokens 1048576 \
        --reps 1 --decode-contexts "" --layer-remat staged --timeout 900   # the 1M-token layer

``--remat`` wraps each layer in ``nnx.remat`` with the model's block policy (ModelConfig.remat:
what a multi-layer model keeps between layers; for one layer it only adds recompute).
``--layer-remat staged`` is SessaConfig.layer_remat: the Sessa layer's own staged backward
(what decides one layer's peak; see sessa_jax/models/sessa.py).

Every configuration runs in its own process, so each peak-memory figure is that
configuration's own (``peak_bytes_in_use``) and an out-of-memory failure stays contained.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ("attention", "chunked", "pallas", "dense", "feedback", "feedback-pallas")


def _run_one(args) -> dict:
    """Measure one (impl, T) in this process and return a result dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sessa_jax.models import AttentionBlock, AttentionConfig, SessaConfig, SessaLayer
    from sessa_jax.ops.feedback import feedback_solve

    T, D = args.one_T, args.d_model
    B = max(1, args.tokens // T)
    key = jax.random.PRNGKey(0)
    dt = jnp.bfloat16
    res = dict(impl=args.one_impl, T=T, B=B, D=D, heads=args.heads, chunk=args.chunk,
               segments=args.segments, inverse=args.inverse, unroll=args.unroll,
               gamma_dtype=args.gamma_dtype, remat=args.remat, gpu_loop_tile=args.gpu_loop_tile,
               gpu_min_programs=args.gpu_min_programs,
               layer_remat=(args.layer_remat if args.one_impl in ("chunked", "pallas", "dense")
                            else "none"),
               device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
               jax=jax.__version__)

    if args.one_impl in ("feedback", "feedback-pallas"):
        # The feedback solve alone (no projections or forward branch), for a cost breakdown.
        impl = "pallas" if args.one_impl == "feedback-pallas" else "chunked"
        ks = jax.random.split(key, 4)
        q = jax.random.normal(ks[0], (B, T, D), dt)
        k = jax.random.normal(ks[1], (B, T, D), dt)
        g = (0.9 * jnp.tanh(jax.random.normal(ks[2], (B, T)))).astype(args.gamma_dtype)
        f = jax.random.normal(ks[3], (B, T, D), dt)

        def loss(q, k, g, f):
            s = feedback_solve(q, k, g, f, impl=impl, chunk_size=args.chunk,
                               segments=args.segments, inverse=args.inverse,
                               unroll=args.unroll)
            return jnp.mean(s.astype(jnp.float32) ** 2)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
        inputs = (q, k, g, f)
    else:
        if args.one_impl == "attention":
            layer = AttentionBlock(
                AttentionConfig(d_model=D, n_heads=args.heads, dtype="bfloat16"),
                rngs=nnx.Rngs(0),
            )
        else:
            layer = SessaLayer(
                SessaConfig(d_model=D, n_heads=args.heads, dtype="bfloat16",
                            feedback_impl=args.one_impl, chunk_size=args.chunk,
                            feedback_segments=args.segments, feedback_inverse=args.inverse,
                            feedback_unroll=args.unroll, layer_remat=args.layer_remat),
                rngs=nnx.Rngs(0),
            )
        graphdef, params = nnx.split(layer)
        x = jax.random.normal(key, (B, T, D), dt)
        if args.remat != "none":
            from sessa_jax.models.lm import _REMAT_POLICIES

            policy = _REMAT_POLICIES[args.remat]
            call = nnx.remat(lambda m, h: m(h), policy=policy)
        else:
            call = lambda m, h: m(h)

        def loss(params, x):
            y = call(nnx.merge(graphdef, params), x)
            return jnp.mean(y.astype(jnp.float32) ** 2)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        inputs = (params, x)

    t0 = time.perf_counter()
    compiled = fn.lower(*inputs).compile()
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    mem = compiled.memory_analysis()
    if mem is not None:
        res["xla_temp_gib"] = round(mem.temp_size_in_bytes / 2**30, 3)
    out = compiled(*inputs)
    jax.block_until_ready(out)
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


def _run_decode(args) -> dict:
    """Single-token decode speed of one layer at context ``args.one_T`` (B = 1)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sessa_jax.models import AttentionBlock, AttentionConfig, SessaConfig, SessaLayer

    ctx, D = args.one_T, args.d_model
    if args.one_impl == "attention":
        layer = AttentionBlock(AttentionConfig(d_model=D, n_heads=args.heads, dtype="bfloat16"),
                               rngs=nnx.Rngs(0))
    else:
        layer = SessaLayer(SessaConfig(d_model=D, n_heads=args.heads, dtype="bfloat16"),
                           rngs=nnx.Rngs(0))
    cache = layer.init_cache(1, ctx + 1)
    # Random cache contents at position ctx: speed does not depend on how they were made.
    leaves, treedef = jax.tree.flatten(cache)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [
        jnp.full_like(l, ctx) if l.dtype == jnp.int32 else jax.random.normal(k, l.shape, l.dtype)
        for l, k in zip(leaves, keys)
    ]
    cache = jax.tree.unflatten(treedef, leaves)
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 1, D), jnp.bfloat16)

    @jax.jit
    def step(params, x, cache):
        return nnx.merge(graphdef, params).decode_step(x, cache, check=False)

    jax.block_until_ready(step(params, x, cache))
    times = []
    for _ in range(max(args.reps, 20)):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x, cache))
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    return dict(impl=f"decode-{args.one_impl}", T=ctx, B=1, step_ms=round(ms, 3),
                tokens_per_s=round(1e3 / ms, 1), device=str(jax.devices()[0].device_kind))


def _sweep(args) -> list[dict]:
    jobs = []
    for impl in args.impls.split(","):
        for T in (int(t) for t in args.T.split(",")):
            if impl == "dense" and T > args.dense_max_T:
                jobs.append(("skip", impl, T))
            else:
                jobs.append(("train", impl, T))
    for impl in ("attention", "chunked"):
        for ctx in (int(t) for t in args.decode_contexts.split(",") if t):
            jobs.append(("decode", impl, ctx))
    results = []
    for mode, impl, T in jobs:
        if mode == "skip":
            results.append(dict(impl=impl, T=T, status=f"skipped (dense above T={args.dense_max_T}: O(T^2) memory)"))
            continue
        cmd = [sys.executable, __file__, "--one-impl", impl, "--one-T", str(T), "--mode", mode,
               "--tokens", str(args.tokens), "--d-model", str(args.d_model),
               "--heads", str(args.heads), "--chunk", str(args.chunk), "--reps", str(args.reps),
               "--segments", str(args.segments), "--inverse", args.inverse,
               "--unroll", str(args.unroll),
               "--gamma-dtype", args.gamma_dtype, "--remat", args.remat,
               "--layer-remat", args.layer_remat, "--gpu-loop-tile", str(args.gpu_loop_tile),
               "--gpu-min-programs", str(args.gpu_min_programs)]
        t0 = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
            if p.returncode == 0 and lines:
                r = json.loads(lines[-1])
            else:
                err = (p.stderr or "").strip().splitlines()
                oom = any("RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower() for l in err)
                r = dict(impl=impl if mode == "train" else f"decode-{impl}", T=T,
                         status="out of memory" if oom else "failed: " + (err[-1] if err else "?"))
        except subprocess.TimeoutExpired:
            r = dict(impl=impl, T=T, status=f"timeout after {args.timeout}s")
        r["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


def _markdown(results: list[dict]) -> str:
    train = [r for r in results if not str(r.get("impl", "")).startswith("decode")]
    dec = [r for r in results if str(r.get("impl", "")).startswith("decode")]
    Ts = sorted({r["T"] for r in train})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in train)]
    by = {(r["impl"], r["T"]): r for r in train}
    lines = ["| T | B | " + " | ".join(f"{i} ms | {i} peak GiB" for i in impls) + " | chunked / attention |",
             "|---|---|" + "---|---|" * len(impls) + "---|"]
    for T in Ts:
        row = [str(T), str(next((by[(i, T)].get("B", "") for i in impls if (i, T) in by), ""))]
        for i in impls:
            r = by.get((i, T), {})
            if "fwd_bwd_ms" in r:
                row += [f"{r['fwd_bwd_ms']:.2f}", f"{r.get('peak_gib', float('nan')):.2f}"]
            else:
                row += [r.get("status", "-"), ""]
        a, c = by.get(("attention", T), {}), by.get(("chunked", T), {})
        ratio = (f"{c['fwd_bwd_ms'] / a['fwd_bwd_ms']:.2f}x"
                 if "fwd_bwd_ms" in a and "fwd_bwd_ms" in c else "-")
        lines.append("| " + " | ".join(row + [ratio]) + " |")
    if dec:
        lines += ["", "| decode (B=1, one layer) | context | ms / token | tokens/s |", "|---|---|---|---|"]
        for r in dec:
            lines.append(f"| {r['impl']} | {r['T']} | {r.get('step_ms', r.get('status'))} | "
                         f"{r.get('tokens_per_s', '')} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="attention,chunked,feedback,dense")
    p.add_argument("--T", default="512,2048,8192,32768,131072")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (B = tokens // T, at least 1)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--unroll", type=int, default=8,
                   help="sweeps of at most this many chunks are unrolled (feedback_unroll)")
    p.add_argument("--segments", type=int, default=8,
                   help="scans the chunked sweep is split into (causal skipping)")
    p.add_argument("--inverse", default="blocked", choices=("solve", "doubling", "blocked"),
                   help="how the chunked solve inverts its diagonal blocks")
    p.add_argument("--gamma-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="gamma's dtype for --impls feedback (the layer computes it in float32)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots", "save_feedback"),
                   help="wrap each layer in nnx.remat with this block policy (ModelConfig.remat)")
    p.add_argument("--layer-remat", default="none", choices=("none", "staged"),
                   help="the Sessa layer's own staged backward (SessaConfig.layer_remat)")
    p.add_argument("--gpu-loop-tile", type=int, default=0,
                   help="pallas on GPU: feedback_pallas_gpu.LOOP_TILE (0: the program's tile)")
    p.add_argument("--gpu-min-programs", type=int, default=0,
                   help="pallas on GPU: feedback_pallas_gpu.MIN_PROGRAMS (0: no split loops)")
    p.add_argument("--dense-max-T", type=int, default=16384)
    p.add_argument("--decode-contexts", default="4096,32768")
    p.add_argument("--timeout", type=int, default=240)
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table at the end")
    p.add_argument("--one-impl", help=argparse.SUPPRESS)
    p.add_argument("--one-T", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one_impl:
        from sessa_jax.ops import feedback_pallas_gpu

        feedback_pallas_gpu.LOOP_TILE = args.gpu_loop_tile or None
        feedback_pallas_gpu.MIN_PROGRAMS = args.gpu_min_programs or None
        r = _run_decode(args) if args.mode == "decode" else _run_one(args)
        print(json.dumps(r), flush=True)
        return
    results = _sweep(args)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), args=vars(args), results=results), fh, indent=1)
    if args.markdown:
        print(_markdown(results))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
