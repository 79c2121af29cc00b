#!/usr/bin/env python
"""Where one layer's training memory goes: compiled buffer sizes and the saved residuals.

For a SessaLayer (or the same-width AttentionBlock) at D, heads, bf16 compute, f32 params,
B=1: ``jax.jit(jax.grad(loss)).lower(...).compile().memory_analysis()`` (temp, argument and
output bytes, per token) and ``jax.ad_checkpoint.print_saved_residuals`` grouped by
shape/dtype (bytes per token). Nothing runs; works on a CPU host (a proxy for the GPU:
other backends, other fusion and scheduling, cuDNN attention instead of the blocked path).

    python scripts/layer_memory.py --T 16384,65536
    python scripts/layer_memory.py --T 65536 --layer-remat staged --residuals
    python scripts/layer_memory.py --T 65536 --tpu v5p:2x2x1   # XLA:TPU ahead of time (libtpu)

``--tpu TOPOLOGY`` compiles for the first chip of a TPU slice instead (libtpu's topology API,
as scripts/aot_layer.py; no TPU needed): native bf16 and a scheduler that honours
optimization barriers, so a closer proxy for a GPU than XLA:CPU, which computes bf16 dots
on float32 copies of their operands and hoists loop-invariant slices.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import re
import sys


_ITEMSIZE = dict(bf16=2, f16=2, f32=4, f64=8, i32=4, s32=4, u32=4, bool=1, i8=1)


def build(impl, D, heads, chunk, layer_remat, attention_impl="auto"):
    from flax import nnx

    from sessa_jax.models import AttentionBlock, AttentionConfig, SessaConfig, SessaLayer

    if impl == "attention":
        return AttentionBlock(AttentionConfig(d_model=D, n_heads=heads, dtype="bfloat16",
                                              attention_impl=attention_impl), rngs=nnx.Rngs(0))
    extra = {} if layer_remat == "none" else dict(layer_remat=layer_remat)
    return SessaLayer(SessaConfig(d_model=D, n_heads=heads, dtype="bfloat16",
                                  chunk_size=chunk, feedback_impl=impl,
                                  attention_impl=attention_impl, **extra),
                      rngs=nnx.Rngs(0))


def loss_fn(layer, remat):
    """The benchmark's loss (scripts/bench_layer.py): mean(y^2) in float32 of one layer,
    the layer wrapped in ``nnx.remat`` with the model's block policy unless remat="none"."""
    import jax.numpy as jnp
    from flax import nnx

    from sessa_jax.models.lm import _REMAT_POLICIES

    graphdef, params = nnx.split(layer)

    def loss(params, x):
        m = nnx.merge(graphdef, params)
        if remat == "none":
            y = m(x)
        else:
            y = nnx.remat(lambda b, h: b(h), policy=_REMAT_POLICIES[remat])(m, x)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    return loss, params


def residual_table(loss, params, x):
    import jax

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        jax.ad_checkpoint.print_saved_residuals(loss, params, x)
    rows = collections.Counter()
    for line in buf.getvalue().splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\]\s+(.*)", line.strip())
        if not m:
            continue
        rows[(m.group(1), m.group(2), m.group(3)[:110])] += 1
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impls", default="attention,chunked")
    p.add_argument("--T", default="16384,65536")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--remat", default="none", choices=("none", "full", "dots", "save_feedback"),
                   help="block-level nnx.remat policy, as ModelConfig.remat")
    p.add_argument("--layer-remat", default="none", choices=("none", "staged"),
                   help="SessaConfig.layer_remat")
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--residuals", action="store_true", help="list the saved residuals")
    p.add_argument("--tpu", default=None, metavar="TOPOLOGY",
                   help="compile for the first chip of this TPU topology (e.g. v5p:2x2x1)")
    args = p.parse_args()

    device = None
    if args.tpu:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from aot_layer import _env
        from aot_compile import parse_topology

        _env(*parse_topology(args.tpu))
        from jax.experimental import topologies

        device = topologies.get_topology_desc(topology_name=args.tpu, platform="tpu").devices[0]

    import jax
    import jax.numpy as jnp
    import numpy as np

    for impl in args.impls.split(","):
        for T in (int(t) for t in args.T.split(",")):
            layer = build(impl, args.d_model, args.heads, args.chunk, args.layer_remat,
                          args.attention_impl)
            loss, params = loss_fn(layer, args.remat)
            if device is not None:
                from jax.sharding import SingleDeviceSharding

                sh = SingleDeviceSharding(device)
                params = jax.tree.map(
                    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), params)
                x = jax.ShapeDtypeStruct((1, T, args.d_model), jnp.bfloat16, sharding=sh)
            else:
                x = jax.ShapeDtypeStruct((1, T, args.d_model), jnp.bfloat16)
            c = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
            m = c.memory_analysis()
            r = dict(impl=impl, T=T, remat=args.remat, layer_remat=args.layer_remat,
                     backend=f"tpu {args.tpu}" if args.tpu else jax.default_backend(),
                     temp_B_per_token=round(m.temp_size_in_bytes / T),
                     arg_B_per_token=round(m.argument_size_in_bytes / T),
                     out_B_per_token=round(m.output_size_in_bytes / T),
                     alias_B=m.alias_size_in_bytes)
            r["total_B_per_token"] = (r["temp_B_per_token"] + r["arg_B_per_token"]
                                      + r["out_B_per_token"])
            print(json.dumps(r), flush=True)
            if args.residuals:
                xs = jnp.zeros((1, T, args.d_model), jnp.bfloat16)
                rows = residual_table(loss, params, xs)
                tot = 0
                for (dt, shape, what), k in sorted(
                    rows.items(),
                    key=lambda kv: -np.prod([int(s) for s in kv[0][1].split(",") if s] or [1])
                    * kv[1],
                ):
                    n = int(np.prod([int(s) for s in shape.split(",") if s] or [1]))
                    b = n * _ITEMSIZE.get(dt, 4) * k / T
                    tot += b
                    if b >= 1:
                        print(f"  {b:9.1f} B/token  {k} x {dt}[{shape}]  {what}")
                print(f"  {tot:9.1f} B/token saved in all")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    main()
