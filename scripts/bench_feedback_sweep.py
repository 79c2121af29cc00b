#!/usr/bin/env python
"""The feedback solve alone (fwd+bwd, bf16, D=768, 16,384 tokens a step) over chunk sizes,
segment counts and ``feedback_unroll``, each configuration in its own process (so XLA_FLAGS
can differ per row).

    python scripts/bench_feedback_sweep.py '[{"T": 8192, "c": 2048, "seg": 8, "unroll": 8},
                                             {"T": 8192, "c": 512, "seg": 8, "unroll": 0}]'

A row may carry "flags" (XLA_FLAGS for that process). Writes $OUT/fb_sweep.json (or ./).
"""
import json
import os
import statistics
import subprocess
import sys
import time


def one(T, c, seg, unroll, tokens=16384, D=768):
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from sessa_jax.ops.feedback import feedback_solve

    B = max(1, tokens // T)
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    dt = jnp.bfloat16
    q = jax.random.normal(ks[0], (B, T, D), dt)
    k = jax.random.normal(ks[1], (B, T, D), dt)
    g = 0.9 * jnp.tanh(jax.random.normal(ks[2], (B, T)))  # float32, as the layer makes it
    f = jax.random.normal(ks[3], (B, T, D), dt)

    def loss(q, k, g, f):
        s = feedback_solve(q, k, g, f, chunk_size=c, segments=seg, unroll=unroll)
        return jnp.mean(s.astype(jnp.float32) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(q, k, g, f))
    comp = time.perf_counter() - t0
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, g, f))
        ts.append((time.perf_counter() - t0) * 1e3)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(T=T, B=B, c=c, seg=seg, unroll=unroll, flags=os.environ.get("XLA_FLAGS", ""),
                ms=round(statistics.median(ts), 3), compile_s=round(comp, 1),
                peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 3),
                device=jax.devices()[0].device_kind, jax=jax.__version__)


def main():
    if sys.argv[1] == "one":
        T, c, seg, unroll = map(int, sys.argv[2:6])
        print("RESULT", json.dumps(one(T, c, seg, unroll)), flush=True)
        return
    out = []
    for cfg in json.loads(sys.argv[1]):
        env = dict(os.environ)
        if cfg.get("flags"):
            env["XLA_FLAGS"] = cfg["flags"]
        argv = [str(cfg[k]) for k in ("T", "c", "seg", "unroll")]
        p = subprocess.run([sys.executable, __file__, "one", *argv], capture_output=True,
                           text=True, env=env, timeout=300)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
        r = json.loads(line[0][7:]) if line else dict(cfg, error=p.stderr[-600:])
        print(json.dumps(r), flush=True)
        out.append(r)
    with open(os.path.join(os.environ.get("OUT", "."), "fb_sweep.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
