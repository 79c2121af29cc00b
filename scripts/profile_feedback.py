#!/usr/bin/env python
"""Where the time goes in the chunked feedback solve: a device trace, aggregated by kernel.

    python scripts/profile_feedback.py --T 8192 --B 2 --chunk 512 --out /tmp/prof

Runs forward+backward a few times under ``jax.profiler.trace`` with a Perfetto trace, then
reads the trace's JSON events and prints the kernels that take the most device time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--D", type=int, default=768)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="/tmp/sessa_profile")
    args = p.parse_args()

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import jax
    import jax.numpy as jnp

    from sessa_jax.ops.feedback import feedback_solve

    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    B, T, D = args.B, args.T, args.D
    q = jax.random.normal(ks[0], (B, T, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, D), jnp.bfloat16)
    g = (0.9 * jnp.tanh(jax.random.normal(ks[2], (B, T)))).astype(jnp.bfloat16)
    f = jax.random.normal(ks[3], (B, T, D), jnp.bfloat16)

    def loss(q, k, g, f):
        s = feedback_solve(q, k, g, f, chunk_size=args.chunk)
        return jnp.mean(s.astype(jnp.float32) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    jax.block_until_ready(fn(q, k, g, f))
    t0 = time.perf_counter()
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        for _ in range(args.reps):
            jax.block_until_ready(fn(q, k, g, f))
    wall = (time.perf_counter() - t0) / args.reps * 1e3

    files = glob.glob(os.path.join(args.out, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        print("no perfetto trace written; look in", args.out)
        return
    with gzip.open(max(files, key=os.path.getmtime)) as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    # Device (GPU stream) events live under process names mentioning the device.
    pid_names = {e["pid"]: e["args"].get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev_pids = {pid for pid, n in pid_names.items() if "/device:" in n or "GPU" in n or "gpu" in n}
    if not dev_pids:
        print("no device events found; processes in the trace:", sorted(set(pid_names.values())))
    per = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in dev_pids:
            per[e["name"]] += e.get("dur", 0.0)
            count[e["name"]] += 1
    total = sum(per.values()) / args.reps
    print(f"T={T} B={B} D={D} chunk={args.chunk}: wall {wall:.2f} ms/step, "
          f"device kernels {total / 1e3:.2f} ms/step over {sum(count.values()) // args.reps} launches")
    for name, dur in per.most_common(args.top):
        print(f"{dur / args.reps / 1e3:8.3f} ms  {count[name] // args.reps:5d}x  {name[:110]}")


if __name__ == "__main__":
    main()
