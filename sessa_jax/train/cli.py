"""Command lines: ``sessa-train`` and ``sessa-eval`` (also ``python -m sessa_jax.train``).

    sessa-train --config configs/quickstart.yaml [--check] [key.sub=value ...]
    sessa-eval --run runs/quickstart [--step N] [--split valid|test] [data.seq_len=256 ...]

Expected failures print one line to stderr; exit codes are those of :mod:`sessa_jax.console`
(0 ok, 1 diverged, 2 config, 3 data, 4 checkpoint/weights, 130 SIGINT, 143 SIGTERM).
Module-level imports stay light: signal handlers go in before JAX/Orbax/Grain load.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from sessa_jax.console import (
    EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, early_signals, fail,
    one_line_warnings, quiet_logs, restore_signals,
)


def _user_errors(prog: str, e: BaseException) -> Optional[int]:
    """The exit code of an expected failure (printing its line), or None for anything else."""
    from sessa_jax.data import DataError
    from sessa_jax.paths import PathError
    from sessa_jax.train.checkpoint import CheckpointError
    from sessa_jax.train.config import ConfigError

    for kind, code in ((ConfigError, EXIT_CONFIG), (PathError, EXIT_CONFIG),
                       (DataError, EXIT_DATA), (CheckpointError, EXIT_CHECKPOINT)):
        if isinstance(e, kind):
            return fail(prog, e, code)
    return None


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    prev = early_signals("sessa-train")
    try:
        return _train_main(argv)
    finally:
        restore_signals(prev)


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    prev = early_signals("sessa-eval")
    try:
        return _eval_main(argv)
    finally:
        restore_signals(prev)


def _train_main(argv) -> int:
    p = argparse.ArgumentParser(
        prog="sessa-train",
        description="Train a Sessa / Transformer / Mamba decoder on a task or text.",
        epilog="Overrides: key.sub=value, values parsed as YAML, e.g. run.steps=500 "
               "optimizer.lr=1e-3 model=configs/models/sessa-tiny.yaml. Exit codes: 0 done, "
               "1 diverged, 2 config error, 3 data error, 4 checkpoint error, 130/143 "
               "interrupted (after saving).",
    )
    p.add_argument("--config", help="YAML config file, e.g. configs/quickstart.yaml")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")
    p.add_argument("--check", action="store_true",
                   help="check the config, mesh and data, then exit without writing anything")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)
    one_line_warnings("sessa-train")
    if not args.config:
        print("sessa-train: error: no --config given: pass a YAML config, e.g. "
              "sessa-train --config configs/quickstart.yaml (a one-minute CPU run), or one of "
              "configs/tasks/*.yaml", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        from sessa_jax.train.config import dump_yaml, load_config
        from sessa_jax.train.mesh import maybe_initialize_distributed
        maybe_initialize_distributed()
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        quiet_logs()
        from sessa_jax.train.loop import NonFiniteError, preflight, train
        if args.check:
            print(preflight(cfg).describe())
            return 0
        try:
            result = train(cfg)
        except NonFiniteError as e:
            return fail("sessa-train", e, EXIT_DIVERGED)
        return result.exit_code
    except Exception as e:
        code = _user_errors("sessa-train", e)
        if code is None:
            raise
        return code


def _eval_main(argv) -> int:
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
    one_line_warnings("sessa-eval")
    try:
        from sessa_jax.train.mesh import maybe_initialize_distributed
        maybe_initialize_distributed()
        quiet_logs()  # read-only Orbax managers warn about being read-only
        from sessa_jax.train.loop import evaluate_checkpoint
        import jax
        result = evaluate_checkpoint(args.run, args.step, args.overrides, args.split)
        if jax.process_index() == 0:
            print(json.dumps(result))
        return 0
    except Exception as e:
        code = _user_errors("sessa-eval", e)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(train_main())
