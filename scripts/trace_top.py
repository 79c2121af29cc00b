#!/usr/bin/env python
"""The device kernels that take the most time in a ``jax.profiler`` trace.

    python scripts/trace_top.py runs/x/profile                 # a run's run.profile_steps trace
    python scripts/trace_top.py trace.json.gz --steps 3 --top 40
    python scripts/trace_top.py trace.json.gz --steps 3 --hlo module.jit_step.sm_9.0a_gpu_after_optimizations.txt

Reads the Perfetto trace (``*.trace.json.gz`` / ``perfetto_trace.json.gz``, written with
``create_perfetto_trace=True``: the training loop's ``run.profile_steps`` and
``scripts/profile_feedback.py`` write one) and sums the duration of every event on a device
stream by kernel name. ``--steps`` divides by the number of traced steps, so the figures read
as milliseconds per step. Works on any machine (the trace is plain JSON), so a trace taken on
the GPU can be read here.

``--hlo``: the step's optimized HLO text (``XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text
--xla_dump_hlo_module_re=jit_step"``) adds a table that groups the kernels by what they are:
the HLO instruction's kind (fusion kind or custom-call target), output shape and the JAX op it
came from, summed over the layers (fusion names differ only by their numeric suffix per layer).
That is how a slow merged GEMM or a transpose is traced back to a line of model code.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys


def find_trace(path: str) -> str:
    """A trace file, or the newest Perfetto trace under a directory."""
    if os.path.isfile(path):
        return path
    files = [f for pat in ("*.trace.json.gz", "perfetto_trace.json.gz")
             for f in glob.glob(os.path.join(path, "**", pat), recursive=True)]
    if not files:
        raise SystemExit(f"trace_top: no *.trace.json.gz or perfetto_trace.json.gz under {path}")
    return max(files, key=os.path.getmtime)


def device_kernels(trace_path: str) -> tuple[collections.Counter, collections.Counter]:
    """(total microseconds, launches) per kernel name, over the device-stream events."""
    with gzip.open(trace_path) if trace_path.endswith(".gz") else open(trace_path) as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pid_names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = {pid for pid, n in pid_names.items() if "/device:" in n or "gpu" in n.lower()}
    if not dev:
        raise SystemExit("trace_top: no device events; processes in the trace: "
                         f"{sorted(set(pid_names.values()))}")
    # A GPU's process has one line per CUDA stream (the kernels) and derived lines ("XLA Ops",
    # "XLA Modules", "Steps") that repeat the same time: count the streams only, if any.
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in dev}
    streams = {k for k, n in threads.items() if "stream" in n.lower()}
    dur, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in dev:
            continue
        if not streams or (e["pid"], e.get("tid")) in streams:
            name = e.get("args", {}).get("hlo_op") or e["name"]
            dur[name] += e.get("dur", 0.0)
            count[name] += 1
    return dur, count


def category(name: str) -> str:
    """A coarse kind for a kernel name: where a step's time goes at a glance."""
    n = name.lower()
    for key, cat in (("gemm", "matmul"), ("dot", "matmul"), ("cublas", "matmul"),
                     ("cutlass", "matmul"), ("cudnn", "attention (cuDNN)"),
                     ("flash", "attention (cuDNN)"), ("triton", "triton fusion"),
                     ("reduce", "reduction fusion"), ("transpose", "copy / transpose"),
                     ("copy", "copy / transpose"), ("memset", "memset"),
                     ("scatter", "scatter / gather"), ("gather", "scatter / gather"),
                     ("dynamic", "dynamic slice / update"), ("while", "loop"),
                     ("fusion", "elementwise fusion")):
        if key in n:
            return cat
    return "other"


def hlo_instructions(hlo_path: str) -> dict:
    """name -> (kind, output shape, JAX op name) for every instruction of an HLO text dump."""
    opener = gzip.open if hlo_path.endswith(".gz") else open
    with opener(hlo_path, "rt") as fh:
        text = fh.read()
    out = {}
    pat = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$", re.M)
    for m in pat.finditer(text):
        name, shape, op, rest = m.groups()
        tgt = re.search(r'custom_call_target="([^"]+)"', rest)
        kind = re.search(r"kind=(\w+)", rest)
        src = re.search(r'op_name="([^"]+)"', rest)
        out[name] = (op + (f":{tgt.group(1)}" if tgt else "") + (f":{kind.group(1)}" if kind else ""),
                     shape, src.group(1) if src else "")
    return out


def by_hlo(dur: collections.Counter, count: collections.Counter, hlo: dict) -> list:
    """Kernels grouped by (name without its numeric suffix, kind, output shape), largest first:
    [(us, launches, base name, kind, shape, a JAX op name)]."""
    groups = {}
    for name, d in dur.items():
        kind, shape, src = hlo.get(name, ("?", "?", ""))
        key = (re.sub(r"\.\d+$", "", name), kind, shape)
        g = groups.setdefault(key, [0.0, 0, src])
        g[0] += d
        g[1] += count[name]
    return sorted(((g[0], g[1], *k, g[2]) for k, g in groups.items()), key=lambda r: -r[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a trace file or a directory holding one")
    p.add_argument("--steps", type=int, default=1, help="traced steps (per-step figures)")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--hlo", default=None, help="the step's optimized HLO text (.txt or .txt.gz)")
    args = p.parse_args(argv)
    path = find_trace(args.trace)
    dur, count = device_kernels(path)
    total = sum(dur.values())
    s = args.steps
    print(f"{path}: {total / 1e3 / s:.2f} ms of device kernels per step, "
          f"{sum(count.values()) // s} launches per step")
    cats = collections.Counter()
    for name, d in dur.items():
        cats[category(name)] += d
    print("\n| kind | ms/step | share |\n|---|---|---|")
    for c, d in cats.most_common():
        print(f"| {c} | {d / 1e3 / s:.3f} | {d / total:.1%} |")
    print("\n| ms/step | launches/step | share | kernel |\n|---|---|---|---|")
    for name, d in dur.most_common(args.top):
        print(f"| {d / 1e3 / s:.3f} | {count[name] / s:.0f} | {d / total:.1%} | `{name[:100]}` |")
    if args.hlo:
        rows = by_hlo(dur, count, hlo_instructions(args.hlo))
        print("\n| ms/step | launches/step | kernel | HLO kind | output shape | from |"
              "\n|---|---|---|---|---|---|")
        for d, n, base, kind, shape, src in rows[: args.top]:
            print(f"| {d / 1e3 / s:.3f} | {n / s:.0f} | `{base}` | {kind[:40]} | `{shape[:80]}` "
                  f"| `{src[:70]}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
