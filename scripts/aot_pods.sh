#!/usr/bin/env bash
# Compile every pod config's training step for its TPU slice on this (CPU) host and write the
# figures to benchmarks/aot/<config>.json (BENCHMARKS.md quotes them). Needs the [tpu] extra
# (libtpu). The configs scan their layers (model.scan_layers): 3-12 minutes and ~4 GiB of host
# memory each on a 2-core machine (per block, 15 minutes and 14 GiB for the 1B one; for those
# figures run scripts/aot_compile.py ... model.scan_layers=false, as benchmarks/aot/unscanned/).
#   bash scripts/aot_pods.sh [config-name ...]
set -u
cd "$(dirname "$0")/.."
export TPU_WORKER_HOSTNAMES=${TPU_WORKER_HOSTNAMES:-localhost}
declare -A TOPO=(
  [sessa-1b-v5p-128]=v5p:4x4x4 [transformer-1b-v5p-128]=v5p:4x4x4
  [sessa-7b-v5p-512]=v5p:8x8x4 [transformer-7b-v5p-512]=v5p:8x8x4
  [sessa-1b-v5p-128-32k]=v5p:4x4x4 [sessa-1b-v5p-128-128k]=v5p:4x4x4
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(sessa-1b-v5p-128 transformer-1b-v5p-128 sessa-7b-v5p-512 transformer-7b-v5p-512
                              sessa-1b-v5p-128-32k sessa-1b-v5p-128-128k)
mkdir -p benchmarks/aot
status=0
for n in "${names[@]}"; do
  echo "== $n on ${TOPO[$n]}"
  log=$(mktemp)
  python scripts/aot_compile.py --config "configs/pods/$n.yaml" --topology "${TOPO[$n]}" \
    --json "benchmarks/aot/$n.json" > "$log" 2>&1 || status=1
  grep -v '^WARNING\|^I0000\|^E0000' "$log"; rm -f "$log"
done
# The table BENCHMARKS.md quotes, from every JSON present.
python - <<'PY'
import glob, json
GiB = 2 ** 30
print("\n| config | slice | mesh | params | per-chip total (temporaries) of HBM | fits | "
      "tokens/s at 40% MFU | compile s (CPU s) | compiled HLO |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob("benchmarks/aot/*.json")):
    r = json.load(open(path))
    if "bytes_per_chip" not in r:  # other AOT figures share the folder
        continue
    b = r["bytes_per_chip"]
    mesh = r["mesh"].split(" on ")[0].replace("mesh ", "")
    cpu = f" ({r['compile_cpu_sec']:.0f})" if "compile_cpu_sec" in r else ""
    hlo = f"{r['hlo']['compiled_chars'] / 1e6:.1f}M chars" if "hlo" in r else "-"
    print(f"| {r['config'].split('/')[-1][:-5]} | {r['topology']} ({r['chips']} chips) | {mesh} | "
          f"{r['params'] / 1e9:.2f}B | {b['total'] / GiB:.1f} GiB ({b['temporary'] / GiB:.1f}) of "
          f"{r['hbm_bytes'] / GiB:.0f} GiB | {'yes' if r['fits'] else 'NO'} | "
          f"{r['tokens_per_sec_at_40_60_mfu'][0]:,.0f} | {r['compile_sec']:.0f}{cpu} | {hlo} |")
PY
exit $status
