"""``sessa-export``: a training run's parameters -> safetensors + config.json.

``--format native`` (default): this package's own layout, read by ``load_pretrained``.
``--format hf``: a Hugging Face / PyTorch directory (see :mod:`sessa_jax.export.hf`).

Exit codes (:mod:`sessa_jax.console`): 0 exported, 2 bad arguments or directory, 4 no usable
checkpoint (unreadable, checksum mismatch, non-finite weights).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sessa_jax.console import EXIT_CHECKPOINT, EXIT_CONFIG, fail, one_line_warnings, quiet_logs


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="sessa-export",
        description="Export the parameters of a training run's checkpoint as safetensors "
                    "(sharded by size) plus config.json; no optimizer state, no pickle.")
    p.add_argument("--run", required=True, help="training run directory (run.output_dir)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="dtype of the exported floating-point tensors (default fp32)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="split into numbered shards above this size (e.g. 2GB, 500MB, 1GiB)")
    p.add_argument("--format", default="native", choices=("native", "hf"),
                   help="native: sessa_jax's layout (load_pretrained); hf: Hugging Face / "
                        "PyTorch (AutoModelForCausalLM, trust_remote_code=True)")
    args = p.parse_args(argv)
    one_line_warnings("sessa-export")
    quiet_logs()
    if args.format == "hf":
        return _export_hf(args)

    from sessa_jax.export.core import ExportError, export_run
    from sessa_jax.train.checkpoint import CheckpointError

    try:
        s = export_run(args.run, args.out, step=args.step, dtype=args.dtype,
                       max_shard_size=args.max_shard_size)
    except ExportError as e:
        return fail("sessa-export", e, EXIT_CONFIG)
    except CheckpointError as e:
        return fail("sessa-export", e, EXIT_CHECKPOINT)
    print(f"exported step {s['step']}: {s['n_params']:,} parameters in {s['n_tensors']} tensors, "
          f"{s['total_bytes'] / 1e6:.2f} MB {s['dtype']}, {len(s['files'])} file(s) -> "
          f"{s['out_dir']}")
    return 0


def _export_hf(args) -> int:
    from sessa_jax.export.core import ExportError
    from sessa_jax.export.hf import export_run_hf, hf_available, loading_hint
    from sessa_jax.train.checkpoint import CheckpointError

    try:
        s = export_run_hf(args.run, args.out, step=args.step, dtype=args.dtype,
                          max_shard_size=args.max_shard_size)
    except ExportError as e:
        return fail("sessa-export", e, EXIT_CONFIG)
    except CheckpointError as e:
        return fail("sessa-export", e, EXIT_CHECKPOINT)
    from sessa_jax.export.core import make_readable

    from sessa_jax.paths import user_path

    for f in user_path(s["out_dir"]).iterdir():  # exports are shared: 0644, as native ones
        if f.is_file():
            make_readable(f)
    print(f"exported step {s['step']} for Hugging Face: {s['n_params']:,} parameters in "
          f"{s['n_tensors']} tensors, {s['total_bytes'] / 1e6:.2f} MB {s['dtype']}, "
          f"{len(s['files'])} file(s) -> {s['out_dir']}; load with "
          "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)")
    if not hf_available():
        print(f"sessa-export: note: {loading_hint()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
