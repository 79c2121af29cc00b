#!/usr/bin/env bash
# The issue-14/16 figures on one GPU, in parts that each fit a 10-minute device call:
#   bash scripts/h200_issue14.sh layer   OUT_DIR   # one layer vs attention, T=512..131072, decode
#   bash scripts/h200_issue14.sh models  OUT_DIR   # 125M Sessa vs Transformer at T=2048 and 8192
#   bash scripts/h200_issue14.sh million OUT_DIR   # T=1,048,576: one layer, the 125M model
#   bash scripts/h200_issue14.sh datawait OUT_DIR  # 125M at T=2048: device idle on input
#   bash scripts/h200_issue14.sh kernels OUT_DIR   # the GPU (Triton) feedback kernels: checked
#                                                  # against dense, then timed with and without
#                                                  # the untimed knobs, chunked alongside
# Each part writes JSON and logs under OUT_DIR; BENCHMARKS.md quotes them.
set -u
cd "$(dirname "$0")/.."
part=${1:?part: layer, models, million, datawait or kernels}
out=${2:?output directory}
mkdir -p "$out"
py=${PYTHON:-python3}
case "$part" in
layer)
  # Chunks of 2048 (the 125M GPU configs' setting); looped sweeps beyond 8 chunks.
  $py scripts/bench_layer.py --impls attention,chunked --T 512,2048,8192,32768,131072 \
    --chunk 2048 --decode-contexts 4096,32768 --out "$out/layer.json" --markdown
  ;;
models)
  # Scanned layers: one block body to compile (12 unrolled Sessa layers took 91 s).
  for fam in sessa transformer; do
    $py scripts/bench_multi_gpu.py --config configs/gpu/$fam-125m-2gpu.yaml --devices 1 \
      --modes strong --steps 150 --log-every 10 --out "$out/$fam-2048.json" \
      model.scan_layers=true
  done
  for fam in sessa transformer; do
    $py scripts/bench_multi_gpu.py --config configs/gpu/$fam-125m-2gpu.yaml --devices 1 \
      --modes strong --steps 60 --log-every 10 --out "$out/$fam-8192.json" \
      model.scan_layers=true data.seq_len=8192 run.global_batch_size=4
  done
  ;;
million)
  # One layer at 1M tokens, staged (issue 14: <= 27 GiB), attention in the same run.
  $py scripts/bench_layer.py --impls attention,chunked --T 1048576 --tokens 1048576 \
    --chunk 512 --reps 1 --decode-contexts "" --layer-remat staged --timeout 400 \
    --out "$out/layer-1m.json" --markdown
  # The whole 12-layer model: compiled for this GPU, memory against its limit (no step run:
  # one step takes longer than a device call allows, see BENCHMARKS.md).
  $py scripts/aot_compile.py --config configs/gpu/sessa-125m-1m.yaml --topology local \
    --json "$out/aot-125m-1m.json"
  # The same, scanned (the layout that kept ~45 KB a token a layer more at long T).
  $py scripts/aot_compile.py --config configs/gpu/sessa-125m-1m.yaml --topology local \
    --json "$out/aot-125m-1m-scanned.json" model.scan_layers=true
  # The same model with one layer, trained for two real steps at 1M tokens.
  $py scripts/bench_multi_gpu.py --config configs/gpu/sessa-125m-1m.yaml --devices 1 \
    --modes strong --steps 3 --log-every 1 --out "$out/train-1m-1layer.json" model.n_layers=1
  ;;
datawait)
  # issue 16: does the input pipeline leave the device idle? (Goodput's data_stall_sec)
  $py scripts/bench_multi_gpu.py --config configs/gpu/sessa-125m-2gpu.yaml --devices 1 \
    --modes strong --steps 150 --log-every 10 --out "$out/sessa-2048-datawait.json" \
    model.scan_layers=true
  ;;
kernels)
  # issue 14 item 1 on a GPU: float32 and bf16 results against "dense" (float64), the default
  # tiles and the two knobs; then the solve alone, chunked vs pallas, at chunk 512 and 2048.
  $py scripts/check_feedback_gpu.py --out "$out/check.json"
  $py scripts/check_feedback_gpu.py --out "$out/check-knobs.json" --gpu-loop-tile 64 \
    --gpu-min-programs 264
  for knobs in "" "--gpu-loop-tile 64" "--gpu-min-programs 264" \
      "--gpu-loop-tile 64 --gpu-min-programs 264"; do
    tag=$(echo "$knobs" | tr -dc 'a-z0-9' | cut -c1-40)
    $py scripts/bench_layer.py --impls feedback,feedback-pallas --T 8192 --chunk 512 $knobs \
      --decode-contexts= --timeout 120 --out "$out/solve-8k-c512${tag:+-$tag}.json" --markdown
  done
  $py scripts/bench_layer.py --impls feedback,feedback-pallas --T 8192 --chunk 2048 \
    --gpu-loop-tile 64 --gpu-min-programs 264 --decode-contexts= --timeout 120 \
    --out "$out/solve-8k-c2048-knobs.json" --markdown
  ;;
*)
  echo "unknown part $part (layer, models, million, datawait, kernels)" >&2; exit 2 ;;
esac
