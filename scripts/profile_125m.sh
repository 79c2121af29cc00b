#!/usr/bin/env bash
# Tokens/s and a kernel-level profile of the 125M configs on one GPU, all in one run:
#   bash scripts/profile_125m.sh OUTDIR "mamba2 transformer sessa" [override ...]
#   TAG=onehot bash scripts/profile_125m.sh OUTDIR "mamba2 transformer" model.embed_grad=onehot
# For each family: scripts/bench_multi_gpu.py (40 steps at the config's T=2048 x 16, tokens/s
# the median of the logged windows) with a jax.profiler trace of steps 35-37, then
# scripts/trace_top.py on that trace (ms per step by kernel) into OUTDIR/<family><TAG>_top.md.
# Set XLA_FLAGS=--xla_gpu_enable_command_buffer= to see kernels: with CUDA graphs on (XLA's
# default) a trace shows one opaque command buffer per graph. With DUMP_HLO=1 the step's
# optimized HLO is kept too (OUTDIR/<family><TAG>_hlo.txt.gz) and the table groups kernels by
# HLO instruction (scripts/trace_top.py --hlo): which JAX op each slow kernel came from.
set -euo pipefail
out=${1:?usage: profile_125m.sh OUTDIR "family ..." [override ...]}
families=${2:-mamba2 transformer sessa}
shift $(( $# >= 2 ? 2 : $# ))
tag=${TAG:+_$TAG}
mkdir -p "$out"
for f in $families; do
  work=$(mktemp -d)
  name="$f$tag"
  flags=${XLA_FLAGS:-}
  if [ -n "${DUMP_HLO:-}" ]; then
    flags="$flags --xla_dump_to=$work/hlo --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_step"
  fi
  if ! XLA_FLAGS="$flags" python scripts/bench_multi_gpu.py --config "configs/gpu/$f-125m-2gpu.yaml" --devices 1 \
      --modes strong --steps 40 --keep "$work" --out "$out/${name}_bench.json" \
      'run.profile_steps=[34,37]' "$@" > "$out/${name}_bench.log" 2>&1; then
    tail -20 "$out/${name}_bench.log"; continue
  fi
  echo "== $name: $(grep -E '^ +1 +base' "$out/${name}_bench.log")"
  hlo=()
  if [ -n "${DUMP_HLO:-}" ]; then
    gzip -c "$(ls -S "$work"/hlo/*jit_step*after_optimizations.txt | head -1)" > "$out/${name}_hlo.txt.gz"
    hlo=(--hlo "$out/${name}_hlo.txt.gz")
  fi
  prof=$(ls -d "$work"/d1_b*/profile | head -1)  # d1_b<global batch>
  python scripts/trace_top.py "$prof" --steps 3 --top 60 "${hlo[@]}" > "$out/${name}_top.md"
  sed -n 3,12p "$out/${name}_top.md"
  trace=$(find "$prof" -name '*.trace.json.gz' -o -name 'perfetto_trace.json.gz' | head -1)
  if [ -n "$trace" ] && [ "$(stat -c %s "$trace")" -lt 15000000 ]; then cp "$trace" "$out/${name}_trace.json.gz"; fi
  rm -rf "$work"
done
