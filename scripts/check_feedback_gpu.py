#!/usr/bin/env python
"""Check ``feedback_impl="pallas"`` on the GPU it runs on against the dense reference.

Fresh random inputs per case (odd lengths, T = 1, lengths not a multiple of the chunk,
several chunks, packed segments, D = 64, 768 and 864); the reference is ``"dense"`` in float64 on
the same device (x64 on), compared with the kernels' float32 and bfloat16 results: relative
error of s and of the four gradients. Exits non-zero when a case misses its tolerance
(float32: 1e-4, bfloat16: 3e-2).

    python scripts/check_feedback_gpu.py [--out check.json] [--gpu-loop-tile 64] [--gpu-min-programs 264]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true",
                   help="the two small cases only (a smoke run; on CPU the kernels interpret)")
    p.add_argument("--gpu-loop-tile", type=int, default=0,
                   help="feedback_pallas_gpu.LOOP_TILE (0: the program's own tile)")
    p.add_argument("--gpu-min-programs", type=int, default=0,
                   help="feedback_pallas_gpu.MIN_PROGRAMS (0: no split loops)")
    args = p.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from sessa_jax.ops import feedback_pallas_gpu
    from sessa_jax.ops.feedback import feedback_solve

    feedback_pallas_gpu.LOOP_TILE = args.gpu_loop_tile or None
    feedback_pallas_gpu.MIN_PROGRAMS = args.gpu_min_programs or None

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        den = np.linalg.norm(b)
        return float(np.linalg.norm(a - b) / den) if den > 0 else float(np.linalg.norm(a))

    cases = [  # (B, T, D, chunk, segments)
        (1, 1, 64, 64, False), (2, 300, 64, 64, True), (2, 700, 864, 128, True),
        (1, 2500, 768, 512, False),
    ][: 2 if args.small else None]
    tol = {"float32": 1e-4, "bfloat16": 3e-2}
    seeds = np.random.SeedSequence().generate_state(len(cases))
    rows, ok = [], True
    for (B, T, D, chunk, use_seg), seed in zip(cases, seeds):
        ks = jax.random.split(jax.random.PRNGKey(int(seed % 2**31)), 6)
        f64 = jnp.float64
        q = jax.random.normal(ks[0], (B, T, D), f64)
        k = jax.random.normal(ks[1], (B, T, D), f64)
        f = jax.random.normal(ks[2], (B, T, D), f64)
        g = 0.99 * jnp.tanh(jax.random.normal(ks[3], (B, T), f64))
        w = jax.random.normal(ks[4], (B, T, D), f64)
        seg = (jnp.cumsum(jax.random.bernoulli(ks[5], 0.01, (B, T)), axis=1).astype(jnp.int32)
               if use_seg else None)

        def run(impl, dt):
            def loss(q, k, g, f):
                s = feedback_solve(q, k, g, f, impl=impl, chunk_size=chunk, segment_ids=seg)
                return jnp.sum(s.astype(f64) * w), s
            cast = lambda x: x.astype(dt)
            (_, s), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3),
                                                       has_aux=True))(
                cast(q), cast(k), g.astype(jnp.float32), cast(f))
            return s, grads

        ref_s, ref_g = run("dense", f64)
        for name in ("float32", "bfloat16"):
            try:
                s, grads = run("pallas", getattr(jnp, name))
            except Exception as e:  # a compile failure of one case must not hide the others
                print(f"B={B} T={T} D={D} chunk={chunk} {name}: FAILED to run: "
                      f"{type(e).__name__}: {str(e)[:300]}", flush=True)
                ok = False
                rows.append(dict(B=B, T=T, D=D, chunk=chunk, segments=use_seg, dtype=name,
                                 error=f"{type(e).__name__}: {str(e)[:1000]}", ok=False))
                continue
            errs = [rel(s, ref_s)] + [rel(a, b) for a, b in zip(grads, ref_g)]
            good = bool(np.all(np.isfinite(errs)) and max(errs) <= tol[name])
            ok &= good
            rows.append(dict(B=B, T=T, D=D, chunk=chunk, segments=use_seg, dtype=name,
                             err_s=errs[0], err_dq=errs[1], err_dk=errs[2], err_dgamma=errs[3],
                             err_df=errs[4], ok=good))
            print(f"B={B} T={T:5d} D={D:4d} chunk={chunk:4d} seg={use_seg!s:5} {name:8s} "
                  + " ".join(f"{n}={e:.1e}" for n, e in zip(("s", "dq", "dk", "dg", "df"), errs))
                  + ("  ok" if good else "  FAIL"), flush=True)
    report = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, cases=rows,
                  all_ok=ok)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    print("all ok" if ok else "SOME CASES FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
