#!/usr/bin/env python
"""Compile the full sharded training step ahead of time for a TPU slice, on any machine.

    python scripts/aot_compile.py --config configs/pods/sessa-1b-v5p-128.yaml --topology v5p:4x4x4
    python scripts/aot_compile.py --config cfg.yaml --topology v5e:2x2 run.global_batch_size=64
    python scripts/aot_compile.py --config configs/gpu/sessa-125m-1m.yaml --topology local

``--topology local`` compiles for the devices this process sees (a GPU, or the CPU) and checks
the program against the first device's memory limit: will this config fit before a run starts?

TPU devices come from ``jax.experimental.topologies.get_topology_desc`` (needs libtpu:
``pip install "sessa_jax[tpu]"``; no TPU is needed). The mesh of the config is laid over those
devices, the train step of sessa_jax.train.step is lowered on abstract inputs (state shapes from
``jax.eval_shape``) and compiled. Prints per-chip argument / temporary / output bytes against
the chip's HBM, the step's FLOPs and tokens/s at 40% and 60% MFU. Exit status 1 with
"does not fit: ..." when the step needs more HBM than a chip has; 3 when libtpu or the topology
API is unavailable; 2 for a bad config.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

GiB = 2 ** 30
# generation -> (HBM GiB per chip, TPU_ACCELERATOR_TYPE prefix). Peak FLOP/s come from the
# training metrics' table (sessa_jax.train.metrics.peak_flops), the one source for MFU.
CHIPS = {
    "v4": (32, "v4"),
    "v5e": (16, "v5litepod"),
    "v5p": (95, "v5p"),
    "v6e": (32, "v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v6litepod": "v6e"}


def parse_topology(name: str) -> tuple[str, int]:
    """'v5p:2x2x2' -> ('v5p', 8 chips)."""
    m = re.fullmatch(r"\s*([a-z0-9]+)\s*:\s*(\d+(?:x\d+)*)\s*", name.lower())
    if not m:
        raise SystemExit(f"--topology {name!r}: expected GEN:AxB[xC], e.g. v5e:2x2 or v5p:4x4x8")
    gen = _ALIASES.get(m.group(1), m.group(1))
    if gen not in CHIPS:
        raise SystemExit(f"--topology {name!r}: unknown generation {m.group(1)!r} "
                         f"(known: {', '.join(CHIPS)})")
    chips = 1
    for d in m.group(2).split("x"):
        chips *= int(d)
    return gen, chips


def _fmt_gib(b: float) -> str:
    return f"{b / GiB:.3f} GiB" if b >= GiB / 10 else f"{b / 2 ** 20:.2f} MiB"


def does_not_fit(need: float, have: float) -> int:
    print(f"does not fit: needs {need / GiB:.2f} GiB per chip, chip has {have / GiB:.2f} GiB "
          f"({(need - have) / GiB:.2f} GiB over)")
    return 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("--topology", required=True,
                   help="TPU slice, e.g. v5e:2x2, v5p:4x4x8; or 'local' for this machine's devices")
    p.add_argument("--hbm-gib", type=float, default=None, help="override the chip's HBM (GiB)")
    p.add_argument("--show-error", action="store_true",
                   help="print XLA's whole out-of-memory report (largest buffers and their ops)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the figures (and the date, versions, config) as JSON")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)

    local = args.topology.strip().lower() == "local"
    if not local:
        gen, chips = parse_topology(args.topology)
        hbm_gib, acc_prefix = CHIPS[gen]
        hbm = (args.hbm_gib or hbm_gib) * GiB
        # libtpu reads these; without them it probes GCE metadata and logs noise.
        cores = chips * (2 if gen in ("v4", "v5p") else 1)
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{acc_prefix}-{cores}")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # parallel compiles share no lock
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host backend; TPU only via the topology

    import jax

    from sessa_jax.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        print(f"aot_compile: config error: {e}", file=sys.stderr)
        return 2

    if local:
        devices = jax.devices()
        chips = len(devices)
        gen = devices[0].platform
        stats = devices[0].memory_stats() or {}
        if args.hbm_gib:
            hbm = args.hbm_gib * GiB
        elif "bytes_limit" in stats:
            hbm = float(stats["bytes_limit"])
        else:
            print("aot_compile: the local device reports no memory limit; pass --hbm-gib",
                  file=sys.stderr)
            return 2
    else:
        try:
            from jax.experimental import topologies
            topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
            devices = list(topo.devices)
        except Exception as e:  # no libtpu, or a topology libtpu does not know
            print(f"aot_compile: cannot get TPU topology {args.topology!r}: "
                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
                  "  (AOT compilation needs libtpu: pip install 'sessa_jax[tpu]')",
                  file=sys.stderr)
            return 3
        if len(devices) != chips:
            print(f"note: topology {args.topology} has {len(devices)} devices "
                  f"(expected {chips} chips)")

    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from sessa_jax.train.mesh import batch_spec, check_batch, describe, make_mesh
    from sessa_jax.train.metrics import flops_per_token, param_count, peak_flops
    from sessa_jax.train.state import abstract_with_shardings, make_setup
    from sessa_jax.train.step import abstract_batch, make_train_step

    try:
        mesh = make_mesh(cfg.mesh, devices=devices)
        check_batch(cfg, mesh)
    except ConfigError as e:
        print(f"aot_compile: {e}", file=sys.stderr)
        return 2
    hosts = len({d.process_index for d in devices})
    n_params = param_count(cfg.model)
    G, T = cfg.run.global_batch_size, cfg.data.seq_len
    print(f"{args.topology}: {len(devices)} x {devices[0].device_kind}, {hosts} host(s); "
          f"{describe(mesh)}")
    print(f"model: {cfg.model.family} {n_params / 1e9:.3f}B params, d_model={cfg.model.d_model}, "
          f"n_layers={cfg.model.n_layers}, remat={cfg.model.remat}, dtype={cfg.model.dtype}/"
          f"{cfg.model.param_dtype}; batch {G} x {T} tokens, "
          f"grad_accum={cfg.optimizer.grad_accum_steps}")

    t0 = time.time()
    setup = make_setup(cfg, mesh)
    step_fn = make_train_step(cfg, setup)
    state = abstract_with_shardings(setup)
    bsh = NamedSharding(mesh, batch_spec(cfg.mesh.sharding_rules()))
    batch = abstract_batch(cfg, bsh)  # with segment_ids for text, as the data pipeline gives
    lowered = step_fn.lower(state, batch)
    t1 = time.time()
    c1 = time.process_time()  # CPU seconds: less sensitive than wall time to a busy host
    try:
        compiled = lowered.compile()
    except Exception as e:
        msg = str(e)
        if args.show_error:
            print(msg, file=sys.stderr)
        # XLA:TPU refuses programs that exceed HBM: "Used 40.1G of 15.75G hbm"
        m = re.search(r"Used\s+([0-9.]+)([KMGT])?\s+of\s+([0-9.]+)([KMGT])?\s+hbm", msg)
        if m or "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
            unit = {"K": 2 ** 10, "M": 2 ** 20, "G": GiB, "T": 2 ** 40, None: 1}
            if m:
                need = float(m.group(1)) * unit[m.group(2)]
                have = float(m.group(3)) * unit[m.group(4)]
                print(f"(XLA:TPU compile failed: out of HBM; compiler reports "
                      f"{m.group(1)}{m.group(2) or ''} of {m.group(3)}{m.group(4) or ''})")
                return does_not_fit(need, hbm if args.hbm_gib else have)
            state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(setup.abstract))
            t = re.search(r"temporaries \(([0-9.]+)([KMGT])?\)", msg)
            print("(XLA:TPU compile failed: out of HBM: " + msg.splitlines()[0][:300] + ")")
            temps = float(t.group(1)) * unit[t.group(2)] if t else 0.0
            return does_not_fit(max(temps + state_bytes / len(devices), hbm * 1.0001), hbm)
        raise
    t2 = time.time()
    cpu = time.process_time() - c1
    # Program size: the StableHLO handed to XLA, and the optimized HLO it compiled.
    hlo = {"lowered_chars": len(lowered.as_text()), "compiled_chars": len(compiled.as_text())}

    ma = compiled.memory_analysis()
    arg = ma.argument_size_in_bytes
    out = ma.output_size_in_bytes
    alias = ma.alias_size_in_bytes
    temp = ma.temp_size_in_bytes
    code = getattr(ma, "generated_code_size_in_bytes", 0)
    need = arg + out - alias + temp + code
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    flops_chip = float((ca or {}).get("flops", 0.0))
    tokens = G * T
    analytic = flops_per_token(cfg.model, T, n_params)

    print(f"compiled in {t2 - t1:.1f}s, {cpu:.1f} CPU s (lowered in {t1 - t0:.1f}s); "
          f"StableHLO {hlo['lowered_chars'] / 1e6:.2f}M chars, compiled HLO "
          f"{hlo['compiled_chars'] / 1e6:.2f}M chars; scan_layers={cfg.model.scan_layers}")
    print("per-chip memory:")
    print(f"  arguments  {_fmt_gib(arg):>12}   (state + batch shards)")
    print(f"  outputs    {_fmt_gib(out):>12}   ({_fmt_gib(alias)} aliased to donated arguments)")
    print(f"  temporary  {_fmt_gib(temp):>12}")
    print(f"  code       {_fmt_gib(code):>12}")
    print(f"  total      {_fmt_gib(need):>12}   of {_fmt_gib(hbm)} HBM "
          f"({100 * need / hbm:.1f}%)")
    print(f"FLOPs per step: {flops_chip:.4g} per chip (XLA cost analysis), "
          f"{flops_chip * len(devices):.4g} total; analytic 6N+mixing "
          f"{analytic * tokens:.4g} ({analytic:.4g} per token)")
    # MFU by the analytic model FLOPs (XLA counts remat recompute and may count loop bodies once)
    peak = peak_flops(devices[0].device_kind if local else gen)  # bf16 FLOP/s per chip
    for mfu in (0.4, 0.6) if peak else ():
        tps = mfu * peak * len(devices) / analytic
        print(f"  at {int(mfu * 100)}% MFU: {tps:,.0f} tokens/s "
              f"({tps / len(devices):,.0f} per chip), {tokens / tps:.2f} s per step")
    if args.json:
        import datetime
        import json

        import jax as _jax
        import jaxlib
        rec = {
            "date": datetime.date.today().isoformat(), "config": args.config,
            "topology": args.topology, "device_kind": devices[0].device_kind, "overrides": args.overrides, "chips": len(devices),
            "hosts": hosts, "mesh": describe(mesh), "params": n_params,
            "global_batch": G, "seq_len": T, "remat": cfg.model.remat,
            "bytes_per_chip": {"arguments": arg, "outputs": out, "aliased": alias,
                               "temporary": temp, "code": code, "total": need},
            "hbm_bytes": hbm, "fits": need <= hbm, "xla_flops_per_chip": flops_chip,
            "analytic_flops_per_token": analytic,
            "tokens_per_sec_at_40_60_mfu": [0.4 * peak * len(devices) / analytic,
                                            0.6 * peak * len(devices) / analytic] if peak else None,
            "compile_sec": t2 - t1, "compile_cpu_sec": cpu, "lower_sec": t1 - t0,
            "scan_layers": cfg.model.scan_layers, "hlo": hlo,
            "jax": _jax.__version__, "jaxlib": jaxlib.__version__,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=2)
    if need > hbm:
        return does_not_fit(need, hbm)
    print(f"fits: {_fmt_gib(need)} of {_fmt_gib(hbm)} per chip")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
