"""Command lines: ``sessa-train`` and ``sessa-eval`` (also ``python -m sessa_jax.train``).

    sessa-train --config configs/quickstart.yaml [key.sub=value ...]
    sessa-eval --run runs/quickstart [--step N] [--split valid|test] [data.seq_len=256 ...]

User mistakes (config, data files, checkpoints) print one line to stderr and exit 2. A run
stopped by too many non-finite steps exits 1; SIGTERM exits 0 after saving, SIGINT 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import Optional, Sequence

from sessa_jax.data import DataError
from sessa_jax.train.checkpoint import CheckpointError
from sessa_jax.train.config import ConfigError, dump_yaml, load_config

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _fail(prog: str, e: BaseException, code: int = 2) -> int:
    msg = " ".join(str(e).split("\n")).strip() or type(e).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return code


def _one_line_warnings(prog: str) -> None:
    """Warnings (e.g. a corrupted checkpoint skipped) as 'prog: warning: ...' lines."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"{prog}: warning: {message}\n"


def _quiet_logs(level: int = logging.WARNING) -> None:
    # absl/orbax log INFO lines on every save; keep the terminal to our progress lines.
    for name in ("absl", "orbax", "jax._src.distributed"):
        logging.getLogger(name).setLevel(level)


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="sessa-train",
        description="Train a Sessa / Transformer / Mamba decoder on a task or text.",
        epilog="Overrides: key.sub=value, values parsed as YAML, e.g. run.steps=500 "
               "optimizer.lr=1e-3 model=configs/models/sessa-tiny.yaml",
    )
    p.add_argument("--config", help="YAML config file (default: all defaults)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)
    _one_line_warnings("sessa-train")
    try:
        from sessa_jax.train.mesh import maybe_initialize_distributed
        maybe_initialize_distributed()
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        _quiet_logs()
        from sessa_jax.train.loop import NonFiniteError, train
        try:
            result = train(cfg)
        except NonFiniteError as e:
            return _fail("sessa-train", e, 1)
        return result.exit_code
    except USER_ERRORS as e:
        return _fail("sessa-train", e)


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="sessa-eval",
        description="Evaluate a checkpoint of a training run (optionally at another length).",
    )
    p.add_argument("--run", required=True, help="run directory written by sessa-train")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--split", default="valid", choices=("valid", "test"))
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. data.seq_len=1024 run.eval_batches=10")
    args = p.parse_intermixed_args(argv)
    _one_line_warnings("sessa-eval")
    try:
        from sessa_jax.train.mesh import maybe_initialize_distributed
        maybe_initialize_distributed()
        _quiet_logs(level=logging.ERROR)  # read-only Orbax managers warn about being read-only
        from sessa_jax.train.loop import evaluate_checkpoint
        import jax
        result = evaluate_checkpoint(args.run, args.step, args.overrides, args.split)
        if jax.process_index() == 0:
            print(json.dumps(result))
        return 0
    except USER_ERRORS as e:
        return _fail("sessa-eval", e)


if __name__ == "__main__":
    sys.exit(train_main())
