"""Orbax checkpoints of the train state, restorable onto any mesh.

Layout: ``<run_dir>/checkpoints/<step>/`` with two items, ``state`` (the TrainState pytree:
params, opt_state, step, rng, skip counters) and ``meta`` (JSON: the resolved config, the model
structure {family, n_layers, scanned}, the step, library versions). Retention keeps the
last ``keep_last`` checkpoints plus the best one by ``keep_best_metric``.

Restores read into the *current* mesh: the target is the abstract state (``jax.eval_shape``)
carrying the NamedShardings of this run, so a run saved on 8 devices resumes on 1 and back.
They read into the current parameter layout too: a step saved with ``model.scan_layers`` (meta
``model.scanned``) is read in its own layout, verified, then converted
(:mod:`sessa_jax.models.layout`), so scanned and unscanned runs restore each other's steps.
Integrity: ``meta`` records a digest of every array of the state (:mod:`.integrity`) and a
sha256 of itself; every restore recomputes and compares them. A step that fails to restore
(missing files, garbage) or whose arrays do not match their digests is reported with one warning
line naming the step and the array, moved aside to ``<run_dir>/corrupt_checkpoints/`` (read-only
readers leave it in place) and the previous step is used. An explicitly requested step that is
damaged raises :class:`CheckpointError` instead. Weights holding NaN/inf are refused by the
read-only readers (``load_model``, ``sessa-eval``, ``sessa-export``) and skipped by a resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from sessa_jax.console import drop_async_noise
from sessa_jax.paths import PathLike, user_path
from sessa_jax.models import layout
from sessa_jax.train import integrity
from sessa_jax.train.config import CheckpointConfig, TrainConfig, from_dict, to_dict

log = logging.getLogger(__name__)

FORMAT = "sessa_jax.train.v1"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message names the directory."""


def checkpoint_dir(run_dir: PathLike) -> epath.Path:
    """``<run_dir>/checkpoints``; a URI (gs://...) stays one (:func:`sessa_jax.paths.user_path`)."""
    return user_path(run_dir) / "checkpoints"


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def make_meta(cfg: TrainConfig, step: int, checksums: Optional[dict] = None) -> dict:
    """JSON metadata stored beside the state (``checksums``: array path -> digest)."""
    import flax
    meta = {
        "format": FORMAT,
        "step": int(step),
        "config": to_dict(cfg),
        "model": {"family": cfg.model.family, "n_layers": cfg.model.n_layers,
                  "scanned": bool(cfg.model.scan_layers),
                  "vocab_size": cfg.model.vocab_size, "d_model": cfg.model.d_model},
        "versions": {"jax": jax.__version__, "flax": flax.__version__,
                     "orbax": getattr(ocp, "__version__", "?")},
    }
    if checksums is not None:
        meta["checksums"] = {"algorithm": integrity.ALGORITHM, "arrays": checksums}
    meta["meta_sha256"] = _meta_digest(meta)
    return meta


class _Damaged(Exception):
    """A checkpoint step that restored but failed verification; the message names the array."""


def verify_meta(meta) -> None:
    """Raise _Damaged when meta's own sha256 (if recorded) does not match its content."""
    if isinstance(meta, dict) and "meta_sha256" in meta:
        if meta["meta_sha256"] != _meta_digest(meta):
            raise _Damaged("its metadata (meta/metadata) does not match its sha256")


def verify_arrays(meta: dict, tree, *, nonfinite: str = "refuse") -> None:
    """Recompute the digests of ``tree`` (a restored state or {'params': ...}) and compare with
    those saved in ``meta``; raise _Damaged naming the first bad array. Old checkpoints without
    digests are only checked for non-finite values: ``nonfinite`` 'refuse' raises
    NonFiniteWeights, 'skip' raises _Damaged (fall back to an older step)."""
    sums, bad = integrity.digests(tree)
    saved = (meta.get("checksums") or {}) if isinstance(meta, dict) else {}
    if saved:
        if saved.get("algorithm") != integrity.ALGORITHM:
            raise _Damaged(f"its checksums use {saved.get('algorithm')!r}, this version checks "
                           f"{integrity.ALGORITHM!r}")
        wrong = integrity.compare(saved.get("arrays", {}), sums)
        if wrong:
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            raise _Damaged(f"array {wrong[0]} does not match its checksum{more}")
    if bad:
        name = next(iter(bad))
        msg = (f"array {name} holds {bad[name]} non-finite values (NaN/inf)"
               + (f" (and {len(bad) - 1} more arrays)" if len(bad) > 1 else ""))
        raise (NonFiniteWeights if nonfinite == "refuse" else _Damaged)(msg)


class NonFiniteWeights(Exception):
    """Restored weights hold NaN/inf (saved that way: the checksum matched)."""


_OBJECT_REPR = re.compile(r"<[^<>]*(?:object at|bound method|pybind11|function )[^<>]*>")


def _why(e: BaseException) -> str:
    """One short line for an exception raised deep in Orbax/tensorstore."""
    if isinstance(e, (_Damaged, FileNotFoundError)):
        return str(e)
    # tensorstore appends '... See full TensorStore details: <bound method pybind11_...': drop it
    text = re.split(r"\.?\s*See full TensorStore details|<bound method|<built-in", str(e))[0]
    text = _OBJECT_REPR.sub("...", text.strip())
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _warn(msg: str) -> None:
    if jax.process_index() == 0:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class Checkpointer:
    """Save/restore/retention of one run's checkpoints (call from every process)."""

    def __init__(self, run_dir: PathLike, cfg: Optional[CheckpointConfig] = None, *,
                 read_only: bool = False):
        self.run_dir = user_path(run_dir)
        self.directory = checkpoint_dir(self.run_dir)
        self.cfg = cfg or CheckpointConfig()
        self.read_only = read_only
        self._bad: set[int] = set()  # steps found unreadable (left in place when read-only)
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no checkpoints directory (is "
                                  f"{self.run_dir!r} a training run directory?)")
        self.manager = self._make_manager()

    def _make_manager(self) -> ocp.CheckpointManager:
        # A read-only manager logs absl WARNINGs about being read-only: expected, not news.
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if self.read_only:
            absl_log.setLevel(logging.ERROR)
        try:
            return self._new_manager()
        finally:
            absl_log.setLevel(level)

    def _new_manager(self) -> ocp.CheckpointManager:
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
        sums, _ = integrity.digests(state)  # of the exact bits handed to Orbax
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                  meta=ocp.args.JsonSave(make_meta(cfg, step, sums)))
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
            src = self.directory / str(step)
            dst_dir = self.run_dir / "corrupt_checkpoints"
            try:
                dst_dir.mkdir(parents=True, exist_ok=True)
                src.rename(dst_dir / f"{step}-{int(time.time())}")
            except OSError as e:
                log.warning("could not move %s aside: %s", src, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"sessa_set_aside_{step}")
        self.manager = self._make_manager()

    def _restore_with_fallback(self, step: Optional[int], make_args,
                               check: Optional[Callable] = None, *,
                               nonfinite: str = "refuse"):
        """Restore the newest usable step (or exactly ``step``) -> (step, restored Composite).

        ``check(meta, restored)`` returns the tree whose digests to verify. Unreadable or
        mismatching steps fall back to the previous one; non-finite weights raise
        CheckpointError at once (``nonfinite='refuse'``) or fall back too ('skip').
        """
        last_err = None
        for s in self._candidates(step):
            if s in self._bad:
                continue  # already reported by an earlier read of this run
            try:
                out = self.manager.restore(s, args=make_args(s))
                verify_meta(out.meta)
                if check is not None:
                    verify_arrays(out.meta, check(out), nonfinite=nonfinite)
                return s, out
            except NonFiniteWeights as e:
                raise CheckpointError(
                    f"{self.directory}/{s}: {e}; refusing these weights (train from an earlier "
                    "step or pick another --step)") from None
            except Exception as e:  # orbax raises many kinds for missing/garbled files
                drop_async_noise()
                why = _why(e)
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

    def _saved_scanned(self, step: int) -> bool:
        """Whether ``step`` holds its blocks stacked (meta ``model.scanned``; old steps: no)."""
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta
        return bool(((meta or {}).get("model") or {}).get("scanned", False))

    def _layout_args(self, item, scanned_now: bool, make):
        """make_args for _restore_with_fallback: each step is read in the layout it was saved
        in (``item`` converted to it), so its digests verify as saved. -> (make_args, saved
        layouts by step)."""
        saved = {}

        def args(s):
            saved[s] = self._saved_scanned(s)
            target = item if saved[s] == scanned_now else layout.to_layout(item, saved[s])
            return make(target, ocp.checkpoint_utils.construct_restore_args(target))

        return args, saved

    @staticmethod
    def _into_layout(tree, abstract, scanned: bool):
        """A restored tree -> the layout and shardings of ``abstract`` (one jitted copy)."""
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        return jax.jit(lambda t: layout.to_layout(t, scanned), out_shardings=shardings)(tree)

    def restore(self, abstract_state, step: Optional[int] = None):
        """-> (state placed by the shardings in ``abstract_state``, meta dict, step).

        For resuming: a step whose parameters are non-finite is skipped like a damaged one.
        A step saved in the other parameter layout is converted to ``abstract_state``'s.
        """
        scanned = layout.is_scanned(abstract_state.params)
        args, saved = self._layout_args(abstract_state, scanned, lambda t, ra: ocp.args.Composite(
            state=ocp.args.PyTreeRestore(t, restore_args=ra), meta=ocp.args.JsonRestore()))
        s, out = self._restore_with_fallback(step, args, lambda o: o.state, nonfinite="skip")
        state = out.state
        if saved[s] != scanned:
            state = self._into_layout(state, abstract_state, scanned)
        return state, out.meta, s

    def restore_params(self, abstract_params, step: Optional[int] = None):
        """Only the parameters (no optimizer state read) -> (params, meta, step).

        Non-finite parameters raise CheckpointError (nobody wants to evaluate or export them).
        A step saved in the other parameter layout is converted to ``abstract_params``'.
        """
        item = {"params": abstract_params}
        scanned = layout.is_scanned(abstract_params)
        args, saved = self._layout_args(item, scanned, lambda t, ra: ocp.args.Composite(
            state=ocp.args.PyTreeRestore(t, restore_args=ra, partial_restore=True),
            meta=ocp.args.JsonRestore()))
        s, out = self._restore_with_fallback(step, args, lambda o: {"params": o.state["params"]})
        params = out.state["params"]
        if saved[s] != scanned:
            params = self._into_layout(params, abstract_params, scanned)
        return params, out.meta, s

    def restore_params_host(self, abstract_params, step: Optional[int] = None):
        """Only the parameters, into host memory as NumPy arrays -> (params, meta, step).

        No device holds them, not even briefly: an export of a model larger than one
        accelerator's memory needs only host RAM. The digests are checked on the host too.
        """
        import numpy as np

        item = {"params": abstract_params}
        restore_args = jax.tree.map(
            lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), item)

        def args(_):
            return ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item, restore_args=restore_args,
                                             partial_restore=True),
                meta=ocp.args.JsonRestore(),
            )

        s, out = self._restore_with_fallback(step, args, lambda o: {"params": o.state["params"]})
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


def load_params_host(run_dir: PathLike, step: Optional[int] = None):
    """The parameters of checkpoint ``step`` (default: the newest readable one) as a pure dict
    of NumPy arrays in host memory -> (params, TrainConfig, step); for exports."""
    from sessa_jax.train.state import abstract_model

    ck = Checkpointer(run_dir, read_only=True)
    meta, s = ck.read_meta(step)
    cfg = config_from_meta(meta)
    _, abstract, _ = abstract_model(cfg.model)
    params, _, s = ck.restore_params_host(abstract, step)  # falls back as load_model does
    return params, cfg, s


def read_json(path: PathLike) -> Any:
    return json.loads(user_path(path).read_text(encoding="utf-8"))
