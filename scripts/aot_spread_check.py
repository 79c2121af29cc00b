#!/usr/bin/env python
"""Issue 15 at small cost: does the tensor-spread feedback solve gather the global batch?

    python scripts/aot_spread_check.py            # 64 chips, 7B widths, 2 layers, T=2048
    python scripts/aot_spread_check.py --rules data,fsdp   # the opt-out, for comparison

Compiles the training step of configs/pods/sessa-7b-v5p-512.yaml ahead of time (through
scripts/aot_compile.py, so needs libtpu) on v5p:4x4x4 (fsdp=16, tensor=4) with 2 layers, global
batch 64 and T=2048 (~2 minutes on a 2-core host), and counts the collectives in the compiled
HLO whose result is a float array with the global batch as its leading axis and the sequence
length next, i.e. (G, T, ...) activations that no chip should hold. With the solve's inputs
left unpinned before spread_rows this found 11 (all-gathers of (64, 2048, 1216) over fsdp,
all-reduces of (64, 2048, 4864)), 8.43 GiB a chip against 2.37 with the opt-out; with them
pinned, none and 2.12 GiB. Exit status 1 when any is found. Extra key=value overrides pass on.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import aot_compile  # noqa: E402  (sibling script)

COLLECTIVE = re.compile(r"= (bf16|f32)\[(\d+),(\d+)(?:,\d+)*\]\S* "
                        r"(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/pods/sessa-7b-v5p-512.yaml")
    p.add_argument("--topology", default="v5p:4x4x4")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rules", default="data,fsdp,tensor", help="the fb_rows rule")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import jax.stages

    texts = []
    compile_ = jax.stages.Lowered.compile

    def keep_text(self, *a, **k):
        compiled = compile_(self, *a, **k)
        texts.append(compiled.as_text())
        return compiled

    jax.stages.Lowered.compile = keep_text
    rc = aot_compile.main([
        "--config", args.config, "--topology", args.topology,
        f"model.n_layers={args.layers}", f"run.global_batch_size={args.batch}",
        f"data.seq_len={args.seq_len}", f"mesh.rules.fb_rows=[{args.rules}]", *args.overrides,
    ])
    if not texts:
        return rc or 3
    hits = [m.group(0) for m in COLLECTIVE.finditer(texts[0])
            if int(m.group(2)) == args.batch and int(m.group(3)) == args.seq_len]
    print(f"collectives of global-batch (G={args.batch}, T={args.seq_len}, ...) activations: "
          f"{len(hits)}")
    for h in sorted(set(hits)):
        print(f"  {hits.count(h)} x {h[2:]}")
    return 1 if hits else rc


if __name__ == "__main__":
    sys.exit(main())
