#!/usr/bin/env python
"""Training throughput on 1 and on N GPUs of one host: the same config, data + FSDP over them.

    python scripts/bench_multi_gpu.py --config configs/gpu/sessa-125m-2gpu.yaml --devices 1,2 \
        --steps 40 --out benchmarks/multi_gpu_h200x2.json

Each device count is a separate ``sessa-train`` process that sees only its GPUs
(CUDA_VISIBLE_DEVICES), with the mesh ``data=1, fsdp=<count>``. Two batch modes per count > 1:
*strong* keeps the global batch of the 1-device run (per-device batch shrinks), *weak* keeps the
per-device batch (global batch grows). Tokens/s is the median of the loop's logged windows
after the first (which holds compilation), read from the run's metrics.jsonl. ``--platform cpu``
fakes the devices with ``--xla_force_host_platform_device_count`` (a smoke test, not a figure).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

_TRAIN = "import sys; from sessa_jax.train.cli import train_main; sys.exit(train_main(sys.argv[1:]))"


def run_one(args, n: int, batch: int, workdir: str) -> dict:
    out_dir = os.path.join(workdir, f"d{n}_b{batch}")
    env = dict(os.environ)
    if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={n}").strip()
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    cmd = [sys.executable, "-c", _TRAIN, "--config", args.config,
           "mesh.data=1", f"mesh.fsdp={n}", "mesh.tensor=1",
           f"run.global_batch_size={batch}", f"run.steps={args.steps}",
           f"run.log_every={args.log_every}", "run.eval_every=0", "run.eval_batches=1",
           "run.tensorboard=false", "checkpoint.every_steps=0", "checkpoint.async_save=false",
           f"run.output_dir={out_dir}", *args.overrides]
    print(f"== {n} device(s), global batch {batch}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    with open(os.path.join(workdir, f"d{n}_b{batch}.log"), "w") as f:
        f.write(log)
    if proc.returncode != 0:
        print(log[-4000:])
        raise SystemExit(f"bench_multi_gpu: the {n}-device run failed (exit {proc.returncode})")
    rows = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if m.get("tokens_per_sec"):
                rows.append(m)
    if len(rows) < 2:
        raise SystemExit(f"bench_multi_gpu: only {len(rows)} timed windows in the {n}-device run;"
                         " raise --steps or lower --log-every")
    steady = rows[1:]  # the first window follows the compiling step's wake
    tps = statistics.median(r["tokens_per_sec"] for r in steady)
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    # Where the session's time went (train/metrics.py Goodput): the data-wait share of the
    # time spent in steps and waiting for batches.
    goodput = {}
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            goodput = json.load(f).get("goodput") or {}
    busy = (goodput.get("step_sec") or 0.0) + (goodput.get("data_sec") or 0.0)
    return {
        "data_wait_frac": goodput.get("data_sec", 0.0) / busy if busy > 0 else None,
        # without the first batch (pipeline start-up): the per-step stall issue 16 targets
        "data_wait_frac_after_first": _after_first(goodput, busy),
        # the fetches that found the device idle (Goodput.stall), first batch excluded: the
        # share of time the input pipeline can have kept the device waiting
        "device_wait_frac_after_first": _after_first(goodput, busy, "data_stall_sec"),
        "goodput": goodput,
        "devices": n, "global_batch": batch, "per_device_batch": batch / n,
        "tokens_per_sec": tps, "tokens_per_sec_per_device": tps / n,
        "mfu": statistics.median(mfu) if mfu else None,
        "final_loss": rows[-1].get("loss"), "windows": len(steady), "wall_sec": wall,
    }


def _after_first(goodput: dict, busy: float, key: str = "data_sec"):
    if key not in goodput:
        return None
    first = goodput.get("data_first_sec") or 0.0
    rest = busy - first
    return max(0.0, goodput[key] - first) / rest if rest > 0 else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--devices", default="1,2", help="comma-separated device counts")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--modes", default="strong,weak", help="strong and/or weak scaling")
    p.add_argument("--platform", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--keep", default=None, help="keep run dirs and logs here")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)

    sys.path.insert(0, os.getcwd())
    from sessa_jax.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    base_batch = cfg.run.global_batch_size
    counts = [int(c) for c in args.devices.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    workdir = args.keep or tempfile.mkdtemp(prefix="bench_multi_gpu_")
    os.makedirs(workdir, exist_ok=True)

    results = []
    for n in counts:
        batches = [("strong" if n > 1 else "base", base_batch)]
        if n > 1 and "weak" in modes:
            batches.append(("weak", base_batch * n))
        if n > 1 and "strong" not in modes:
            batches = batches[1:]
        for mode, batch in batches:
            r = run_one(args, n, batch, workdir)
            r["mode"] = mode
            results.append(r)
            print(json.dumps(r), flush=True)

    base = next((r for r in results if r["devices"] == counts[0]), results[0])
    device_name = "cpu (fake devices)"
    if args.platform == "gpu":
        try:
            device_name = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            device_name = "gpu"
    import jax

    report = {
        "date": datetime.date.today().isoformat(), "device": device_name,
        "jax": jax.__version__, "config": args.config, "overrides": args.overrides,
        "seq_len": cfg.data.seq_len, "model": cfg.model.family, "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers, "steps": args.steps, "results": results,
    }
    print(f"\n{device_name}, {cfg.model.family} d_model={cfg.model.d_model} "
          f"n_layers={cfg.model.n_layers}, T={cfg.data.seq_len}, {args.steps} steps per run")
    print(f"{'devices':>7} {'mode':>6} {'batch':>5} {'tokens/s':>11} {'per dev':>10} "
          f"{'speed-up':>8} {'MFU':>6} {'host data time (all / after 1st)':>34} {'device idle on data':>20}")
    for r in results:
        speed = r["tokens_per_sec"] / base["tokens_per_sec"]
        r["speedup_vs_1"] = speed
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        idle = (f"{r['device_wait_frac_after_first']:.2%}"
                if r.get("device_wait_frac_after_first") is not None else "n/a")
        wait = " / ".join(f"{r[k]:.2%}" if r.get(k) is not None else "n/a"
                          for k in ("data_wait_frac", "data_wait_frac_after_first"))
        print(f"{r['devices']:>7} {r['mode']:>6} {r['global_batch']:>5} "
              f"{r['tokens_per_sec']:>11,.0f} {r['tokens_per_sec_per_device']:>10,.0f} "
              f"{speed:>7.2f}x {mfu:>6} {wait:>34} {idle:>20}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
