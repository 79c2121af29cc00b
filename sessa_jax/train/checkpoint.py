"""Orbax checkpoints of the train state, restorable onto any mesh.

Layout: ``<run_dir>/checkpoints/<step>/`` with two items, ``state`` (the TrainState pytree:
params, opt_state, step, rng, skip counters) and ``meta`` (JSON: the resolved config, the model
structure {family, n_layers, scanned: false}, the step, library versions). Retention keeps the
last ``keep_last`` checkpoints plus the best one by ``keep_best_metric``.

Restores read into the *current* mesh: the target is the abstract state (``jax.eval_shape``)
carrying the NamedShardings of this run, so a run saved on 8 devices resumes on 1 and back.
A step that fails to restore (missing files, garbage) is reported with a warning, moved aside
to ``<run_dir>/corrupt_checkpoints/`` and the previous step is used.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from sessa_jax.train.config import CheckpointConfig, TrainConfig, from_dict, to_dict

log = logging.getLogger(__name__)

FORMAT = "sessa_jax.train.v1"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message names the directory."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "checkpoints")


def make_meta(cfg: TrainConfig, step: int) -> dict:
    """JSON metadata stored beside the state."""
    import flax
    return {
        "format": FORMAT,
        "step": int(step),
        "config": to_dict(cfg),
        "model": {"family": cfg.model.family, "n_layers": cfg.model.n_layers, "scanned": False,
                  "vocab_size": cfg.model.vocab_size, "d_model": cfg.model.d_model},
        "versions": {"jax": jax.__version__, "flax": flax.__version__,
                     "orbax": getattr(ocp, "__version__", "?")},
    }


def _drop_closed_loop_noise() -> None:
    """After a failed Orbax read, tensorstore callbacks still queued for its (closed) event
    loop raise 'Event loop is closed' as unraisable exceptions, one traceback each. Drop those,
    and only those, for the rest of the process."""
    prev = sys.unraisablehook
    if getattr(prev, "_sessa_filter", False):
        return

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        prev(u)

    hook._sessa_filter = True
    sys.unraisablehook = hook


def _warn(msg: str) -> None:
    if jax.process_index() == 0:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class Checkpointer:
    """Save/restore/retention of one run's checkpoints (call from every process)."""

    def __init__(self, run_dir: str, cfg: Optional[CheckpointConfig] = None, *,
                 read_only: bool = False):
        self.run_dir = os.path.abspath(run_dir)
        self.directory = checkpoint_dir(run_dir)
        self.cfg = cfg or CheckpointConfig()
        self.read_only = read_only
        self._bad: set[int] = set()  # steps found unreadable (left in place when read-only)
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory}: no checkpoints directory (is "
                                  f"{self.run_dir!r} a training run directory?)")
        self.manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        c = self.cfg
        policies = [ocp.checkpoint_managers.LatestN(n=c.keep_last)]
        best = {}
        if c.keep_best_metric:
            name = c.keep_best_metric
            metric = lambda m: float(m[name])  # noqa: E731
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=metric,
                reverse=c.keep_best_mode == "min",  # BestN keeps the tail of an ascending sort
                n=1, keep_checkpoints_without_metrics=False,
            ))
            # best_fn also makes Orbax write each step's metrics, so a resumed run still
            # knows which old checkpoint is the best one.
            best = dict(best_fn=metric, best_mode=c.keep_best_mode)
        options = ocp.CheckpointManagerOptions(
            **best,
            enable_async_checkpointing=c.async_save and not self.read_only,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=not self.read_only,
            read_only=self.read_only,
        )
        return ocp.CheckpointManager(self.directory, options=options)

    # -- saving -------------------------------------------------------------------------------

    def save(self, step: int, state, cfg: TrainConfig, metrics: Optional[dict] = None) -> bool:
        """Start saving ``state`` as ``step`` (returns once arrays are copied off device).

        ``metrics`` (eval metrics of this step) feed best-checkpoint retention.
        """
        if step in self.manager.all_steps():
            return False
        if metrics is not None and self.cfg.keep_best_metric not in metrics:
            metrics = None
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  meta=ocp.args.JsonSave(make_meta(cfg, step)))
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if metrics is None:  # e.g. a save on SIGTERM: Orbax would warn that metrics are missing
            absl_log.setLevel(logging.ERROR)
        try:
            return self.manager.save(step, args=args, metrics=metrics, force=True)
        finally:
            absl_log.setLevel(level)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    # -- reading ------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        s = self.steps()
        return s[-1] if s else None

    def _candidates(self, step: Optional[int]) -> list[int]:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoints found")
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"{self.directory}: no checkpoint at step {step} (have {steps})")
            return [step]
        return steps[::-1]

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step out of the manager's way (process 0 only)."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst_dir = os.path.join(self.run_dir, "corrupt_checkpoints")
            os.makedirs(dst_dir, exist_ok=True)
            dst = os.path.join(dst_dir, f"{step}-{int(time.time())}")
            try:
                shutil.move(src, dst)
            except OSError as e:
                log.warning("could not move %s aside: %s", src, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"sessa_set_aside_{step}")
        self.manager = self._make_manager()

    def _missing(self, step: int) -> Optional[str]:
        """The first file a complete step must have but lacks (None: looks complete).

        Checked before Orbax reads anything: a failed tensorstore read leaves callbacks that
        print 'Event loop is closed' tracebacks, so cheap-to-spot damage is caught here.
        """
        root = os.path.join(self.directory, str(step))
        need = [os.path.join("meta", "metadata"), os.path.join("state", "_METADATA")]
        if os.path.isdir(os.path.join(root, "state", "d")):  # OCDBT layout (Orbax's default)
            need.append(os.path.join("state", "manifest.ocdbt"))
        for rel in need:
            if not os.path.isfile(os.path.join(root, rel)):
                return rel
        return None

    def _restore_with_fallback(self, step: Optional[int], make_args):
        last_err = None
        for s in self._candidates(step):
            if s in self._bad:
                continue  # already reported by an earlier read of this run
            try:
                missing = self._missing(s)
                if missing:
                    raise FileNotFoundError(f"{missing} is missing")
                return s, self.manager.restore(s, args=make_args(s))
            except Exception as e:  # orbax raises many kinds for missing/garbled files
                _drop_closed_loop_noise()
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if step is not None:
                    raise CheckpointError(
                        f"{self.directory}/{s}: checkpoint is unreadable ({why})") from None
                older = [t for t in self.steps() if t < s and t not in self._bad]
                _warn(f"checkpoint {self.directory}/{s} is unreadable ({why}); "
                      + (f"falling back to step {older[-1]}" if older else "no older checkpoint"))
                last_err = why
                self._bad.add(s)
                self._set_aside(s)
        raise CheckpointError(f"{self.directory}: no readable checkpoint (last error: {last_err})")

    def restore(self, abstract_state, step: Optional[int] = None):
        """-> (state placed by the shardings in ``abstract_state``, meta dict, step)."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)

        def args(_):
            return ocp.args.Composite(
                state=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args),
                meta=ocp.args.JsonRestore(),
            )

        s, out = self._restore_with_fallback(step, args)
        return out.state, out.meta, s

    def restore_params(self, abstract_params, step: Optional[int] = None):
        """Only the parameters (no optimizer state read) -> (params, meta, step)."""
        item = {"params": abstract_params}
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)

        def args(_):
            return ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item, restore_args=restore_args,
                                             partial_restore=True),
                meta=ocp.args.JsonRestore(),
            )

        s, out = self._restore_with_fallback(step, args)
        return out.state["params"], out.meta, s

    def read_meta(self, step: Optional[int] = None) -> tuple[dict, int]:
        """The JSON metadata of ``step`` (default: newest readable) -> (meta, step)."""
        s, out = self._restore_with_fallback(
            step, lambda _: ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out.meta, s


def config_from_meta(meta: dict) -> TrainConfig:
    """The TrainConfig stored in a checkpoint's metadata (task files are not re-read)."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint metadata is not {FORMAT!r}: {str(meta)[:200]}")
    return from_dict(meta["config"], check_task=False)


def load_model(run_dir: str, step: Optional[int] = None, mesh=None):
    """Rebuild a trained DecoderLM -> (model, TrainConfig, step).

    Reads only the parameters of checkpoint ``step`` (default: the newest readable one) of the
    run in ``run_dir``, placed on ``mesh`` (default: the first device).
    """
    from sessa_jax.train.mesh import make_mesh
    from sessa_jax.train.config import MeshConfig, replace
    from sessa_jax.train.state import make_setup

    ck = Checkpointer(run_dir, read_only=True)
    meta, s = ck.read_meta(step)
    cfg = config_from_meta(meta)
    if mesh is None:
        mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        cfg = replace(cfg, mesh=MeshConfig(data=1, fsdp=1, tensor=1, rules=cfg.mesh.rules))
    setup = make_setup(cfg, mesh)
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            setup.abstract.params, setup.shardings.params)
    params, _, s = ck.restore_params(abstract, step)
    return setup.model_def(params), cfg, s


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
