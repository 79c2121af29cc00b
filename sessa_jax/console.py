"""What the command lines print and how they exit: one-line errors and warnings, no library noise.

Exit codes shared by ``sessa-train``, ``sessa-eval``, ``sessa-export`` and ``scripts/generate.py``
(README, "Exit codes"):

    0    success (a finished run, an evaluation, an export)
    1    training diverged (too many non-finite steps; the last good step is saved), or a bug
         (a traceback)
    2    configuration or usage error (bad key/value, mesh larger than the devices, missing
         run directory); nothing is written
    3    data error (missing, corrupted or unreadable data file or record; the message names
         the file and the record; a run saves its last good step first)
    4    checkpoint or weights error (no readable checkpoint, checksum mismatch, non-finite
         weights)
    130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM; a run saves a checkpoint first

Light on purpose (no JAX import): the CLIs call :func:`early_signals` before the heavy imports.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings

EXIT_OK, EXIT_DIVERGED, EXIT_CONFIG, EXIT_DATA, EXIT_CHECKPOINT = 0, 1, 2, 3, 4
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def fail(prog: str, e: BaseException, code: int) -> int:
    """Print ``prog: error: <one line>`` to stderr and return ``code``."""
    msg = " ".join(str(e).split()).strip() or type(e).__name__
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return code


def early_signals(prog: str) -> dict:
    """Until the training loop installs its own handlers: SIGTERM/SIGINT print one line and exit
    at once (143/130). Nothing worth saving exists yet, and without this a SIGTERM during the
    first seconds (imports, compilation set-up) ends the process without a word.

    Returns the previous handlers, for :func:`restore_signals`.
    """

    def handle(signum, frame):
        name = signal.Signals(signum).name
        print(f"\n{prog}: {name} received outside the training loop (starting up or "
              "finishing); no step in progress, exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_SIGNAL[name])

    prev = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            prev[sig] = signal.signal(sig, handle)
        except ValueError:  # not the main thread (e.g. called from a test's worker)
            pass
    return prev


def restore_signals(prev: dict) -> None:
    for sig, handler in prev.items():
        signal.signal(sig, handler)


def one_line_warnings(prog: str) -> None:
    """Warnings (e.g. a corrupted checkpoint skipped) as ``prog: warning: ...`` lines, without
    the source line Python would print below them."""
    warnings.formatwarning = lambda message, *args, **kwargs: (
        f"{prog}: warning: {' '.join(str(message).split())}\n")


def quiet_logs(level: int = logging.ERROR) -> None:
    """Silence absl/Orbax INFO and WARNING lines (read-only managers, saves) and asyncio's
    'exception was never retrieved' reports left behind by a failed tensorstore read."""
    for name in ("absl", "orbax", "jax._src.distributed", "tensorstore"):
        logging.getLogger(name).setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR if level >= logging.ERROR
                                   else absl_logging.WARNING)
    except ImportError:
        pass
    drop_async_noise()


def drop_async_noise() -> None:
    """After a failed Orbax read, coroutines and callbacks queued on its (closed) event loop are
    reported as unraisable exceptions, one traceback each (hundreds of lines). Drop those, and
    only those, for the rest of the process."""
    prev = sys.unraisablehook
    if getattr(prev, "_sessa_filter", False):
        return

    def hook(u):
        exc, obj = u.exc_value, u.object
        if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
            return
        if type(obj).__name__ in ("coroutine", "_GatheringFuture", "Task", "Future"):
            return
        if isinstance(exc, (GeneratorExit, RuntimeWarning)) and "coroutine" in repr(obj):
            return
        prev(u)

    hook._sessa_filter = True
    sys.unraisablehook = hook
