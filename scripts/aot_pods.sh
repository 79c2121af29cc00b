#!/usr/bin/env bash
# Compile every pod config's training step for its TPU slice on this (CPU) host and write the
# figures to benchmarks/aot/<config>.json (BENCHMARKS.md quotes them). Needs the [tpu] extra
# (libtpu); about 20 minutes and 10 GiB of host memory on a 2-core machine.
#   bash scripts/aot_pods.sh [config-name ...]
set -u
cd "$(dirname "$0")/.."
export TPU_WORKER_HOSTNAMES=${TPU_WORKER_HOSTNAMES:-localhost}
declare -A TOPO=(
  [sessa-1b-v5p-128]=v5p:4x4x4 [transformer-1b-v5p-128]=v5p:4x4x4
  [sessa-7b-v5p-512]=v5p:8x8x4 [transformer-7b-v5p-512]=v5p:8x8x4
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(sessa-1b-v5p-128 transformer-1b-v5p-128 sessa-7b-v5p-512 transformer-7b-v5p-512)
mkdir -p benchmarks/aot
status=0
for n in "${names[@]}"; do
  echo "== $n on ${TOPO[$n]}"
  log=$(mktemp)
  python scripts/aot_compile.py --config "configs/pods/$n.yaml" --topology "${TOPO[$n]}" \
    --json "benchmarks/aot/$n.json" > "$log" 2>&1 || status=1
  grep -v '^WARNING\|^I0000\|^E0000' "$log"; rm -f "$log"
done
exit $status
