#!/usr/bin/env python
"""The feedback solve alone (fwd+bwd, bf16, D=768, 16,384 tokens a step) over chunk sizes,
segment counts and ``feedback_unroll``, each configuration in its own process (so XLA_FLAGS
can differ per row).

    python scripts/bench_feedback_sweep.py '[{"T": 8192, "c": 2048, "seg": 8, "unroll": 8},
                                             {"T": 8192, "c": 512, "seg": 8, "unroll": 0}]'

A row may carry "flags" (XLA_FLAGS for that process) and "impl" (default: each of
``--impls``, default "chunked"). Every impl other than "chunked" first checks its loss and
gradients against "chunked" at the same configuration (printed as "check": the relative
error ||x - x_chunked|| / ||x_chunked|| of the loss and of each gradient) and is then
timed; an impl that cannot run there (e.g. "pallas" on a GPU) gives a row with "error"
instead of stopping the sweep.

    python scripts/bench_feedback_sweep.py --impls chunked,pallas \
        '[{"T": 8192, "c": 512, "seg": 8, "unroll": 0}]'

Writes $OUT/fb_sweep.json (or ./).
"""
import json
import os
import statistics
import subprocess
import sys
import time


def one(T, c, seg, unroll, impl="chunked"):
    # FB_TOKENS / FB_D shrink the problem for a smoke test (defaults: the benchmark's).
    tokens, D = int(os.environ.get("FB_TOKENS", 16384)), int(os.environ.get("FB_D", 768))
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

    def make(impl):
        def loss(q, k, g, f):
            s = feedback_solve(q, k, g, f, impl=impl, chunk_size=c, segments=seg, unroll=unroll)
            return jnp.mean(s.astype(jnp.float32) ** 2)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))

    fn = make(impl)
    t0 = time.perf_counter()
    first = jax.block_until_ready(fn(q, k, g, f))  # compile + first run
    comp = time.perf_counter() - t0
    check = None
    if impl != "chunked":  # correctness against "chunked" before any timing
        def rel(a, b):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))

        (v, gr), (v0, gr0) = first, make("chunked")(q, k, g, f)
        check = {"loss": rel(v, v0), **{n: rel(a, b) for n, a, b in
                                        zip(("dq_b", "dk_b", "dgamma", "df"), gr, gr0)}}
        check = {n: float(f"{x:.3g}") for n, x in check.items()}
        print("CHECK", impl, "vs chunked", json.dumps(check), flush=True)
        del v0, gr0
    ts = []
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(q, k, g, f))
        ts.append((time.perf_counter() - t0) * 1e3)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(T=T, B=B, c=c, seg=seg, unroll=unroll, impl=impl, check=check,
                flags=os.environ.get("XLA_FLAGS", ""),
                ms=round(statistics.median(ts), 3), compile_s=round(comp, 1),
                peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 3),
                device=jax.devices()[0].device_kind, jax=jax.__version__)


def main():
    if sys.argv[1] == "one":
        T, c, seg, unroll = map(int, sys.argv[2:6])
        impl = sys.argv[6] if len(sys.argv) > 6 else "chunked"
        try:
            r = one(T, c, seg, unroll, impl)
        except NotImplementedError as e:  # an impl with no lowering on this platform
            r = dict(T=T, c=c, seg=seg, unroll=unroll, impl=impl, error=f"NotImplementedError: {e}")
        print("RESULT", json.dumps(r), flush=True)
        return
    args = sys.argv[1:]
    impls = ["chunked"]
    if "--impls" in args:
        i = args.index("--impls")
        impls = args[i + 1].split(",")
        del args[i:i + 2]
    out = []
    for cfg in json.loads(args[0]):
        env = dict(os.environ)
        if cfg.get("flags"):
            env["XLA_FLAGS"] = cfg["flags"]
        for impl in ([cfg["impl"]] if cfg.get("impl") else impls):
            argv = [str(cfg[k]) for k in ("T", "c", "seg", "unroll")] + [impl]
            try:
                p = subprocess.run([sys.executable, __file__, "one", *argv], capture_output=True,
                                   text=True, env=env, timeout=300)
                lines = p.stdout.splitlines()
                for ln in lines:
                    if ln.startswith("CHECK"):
                        print(ln, flush=True)
                line = [ln for ln in lines if ln.startswith("RESULT")]
                r = json.loads(line[0][7:]) if line else dict(cfg, impl=impl,
                                                              error=p.stderr[-600:])
            except subprocess.TimeoutExpired:
                r = dict(cfg, impl=impl, error="timeout (300 s)")
            print(json.dumps(r), flush=True)
            out.append(r)
    with open(os.path.join(os.environ.get("OUT", "."), "fb_sweep.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
