"""The training loop and checkpoint evaluation.

Data flows one way: config -> data + model -> step -> checkpoints/metrics.

``train(cfg)`` builds the mesh and state (fresh, or restored from the newest readable checkpoint
in ``run.output_dir``), then runs ``run.steps`` steps. Metrics of step k are read from the device
after step k+1 is dispatched, so the host never stalls the device except on log/eval/save steps.

SIGTERM/SIGINT: the current step finishes, a checkpoint is written and waited for, and ``train``
returns with ``stopped_by`` set (the CLI exits 143 for SIGTERM, 130 for SIGINT). A second SIGINT
interrupts at once. With several processes a signal may reach only some of them: they agree
every ``run.stop_check_every`` steps and at every checkpoint step (host to host through the
jax.distributed key-value store, no device collective), then all save that step and stop. One
process needs no agreement and stops after the step in flight.

Multi-host: every process must see the same ``run.output_dir`` (a bucket such as
``gs://bucket/run`` or a shared filesystem; see :mod:`sessa_jax.paths`); they check that they
agree on the step to resume from before step 0. Only process 0 writes metrics, TensorBoard,
config.yaml, summary.json and profiles.

The summary's ``goodput`` splits the session's wall time into compilation, setup, data waits,
checkpointing, evaluation, profiling and training steps, with the measured MFU
(:class:`~sessa_jax.train.metrics.Goodput`). ``run.profile_steps`` [a, b] traces steps a+1..b
with ``jax.profiler`` into ``<run_dir>/profile``.

Nothing is written before the config, mesh and data checks pass (:func:`preflight`). An
exception inside the loop (a data error, a diverged run, anything else) first saves a
checkpoint of the last completed step, when its state is intact, then propagates.

``SESSA_DEBUG_STEP_SLEEP`` (seconds, environment) sleeps after every step: a test hook that
makes tiny runs slow enough to be interrupted at a chosen point.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Optional, Sequence

import jax
from etils import epath

from sessa_jax.data import batches, eval_batches, num_eval_batches
from sessa_jax.paths import PathError, append_text, user_path, write_text
from sessa_jax.train.checkpoint import Checkpointer, config_from_meta
from sessa_jax.train.config import (
    EXECUTION_FIELDS, ConfigError, TrainConfig, apply_overrides, check_resume_compatible,
    from_dict, save_config, task_for,
)
from sessa_jax.train.mesh import (
    all_processes, batch_sharding, check_batch, describe, device_kind, forget, global_batch,
    make_mesh, process_rows, same_on_all_processes, set_compilation_cache,
)
from sessa_jax.train.metrics import (
    Goodput, MetricsWriter, Throughput, flops_per_token, fmt_count, fmt_duration, goodput_line,
    param_count, peak_flops, progress_line,
)
from sessa_jax.train.state import (
    Setup, abstract_with_shardings, init_state, make_setup,
)
from sessa_jax.train.stability import make_stats_step
from sessa_jax.train.step import (
    logged_step, make_eval_step, make_train_step, step_batch, summarize_eval,
    token_byte_lengths,
)

def chance_accuracy(data_cfg) -> Optional[float]:
    """Accuracy of uniform guessing among a task's possible answers (None for text)."""
    return {
        "symbol_soup": 1 / 20,  # classes
        "selective_copy": 1 / data_cfg.selective_copy.vocab,
        "mqar": 1 / data_cfg.mqar.value_vocab,
        "passkey": 1 / 10,  # digits
    }.get(data_cfg.task)


class NonFiniteError(RuntimeError):
    """Too many non-finite (skipped) steps in a row."""


@dataclasses.dataclass
class RunResult:
    summary: dict
    stopped_by: Optional[str] = None  # "SIGTERM" / "SIGINT" when a signal ended the run

    @property
    def exit_code(self) -> int:
        from sessa_jax.console import EXIT_SIGNAL
        return EXIT_SIGNAL.get(self.stopped_by, 0)


def _main() -> bool:
    return jax.process_index() == 0


def say(*args) -> None:
    if _main():
        print(*args, flush=True)


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps.

    With several processes, :meth:`requested` answers only every ``every`` steps (and when
    forced, at checkpoint steps): there every process tells the others what it received.
    """

    def __init__(self, every: int = 1):
        self.received: Optional[str] = None
        self.every = every
        self._prev = {}
        self._agreed: list[str] = []  # tags of past agreements (their keys are dropped later)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._prev[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.received = signal.Signals(signum).name
        n = jax.process_count()
        if n == 1:
            print(f"\n{self.received} received: finishing this step, then saving a checkpoint",
                  file=sys.stderr, flush=True)
        else:
            print(f"\nprocess {jax.process_index()}: {self.received} received: the processes "
                  f"agree on it within {self.every} steps (or at the next checkpoint step), "
                  "then save a checkpoint", file=sys.stderr, flush=True)

    def requested(self, step: int, force: bool = False) -> Optional[str]:
        """The signal name if any process got one, the same answer on every process.

        One process: at once, every step. Several: None except at steps that are multiples of
        ``every`` and when ``force`` (checkpoint steps), where the processes agree.
        """
        if jax.process_count() == 1:
            return self.received
        if not force and step % self.every:
            return None
        code = {None: 0, "SIGTERM": 1, "SIGINT": 2}[self.received]
        tag = f"stop/{step}"
        got = max(all_processes(code, tag))
        self._agreed.append(tag)
        if len(self._agreed) > 2:  # every process has read those keys by now
            forget(self._agreed.pop(0))
        return {0: None, 1: "SIGTERM", 2: "SIGINT"}[got]


class Profile:
    """``run.profile_steps`` [a, b]: a jax.profiler trace of steps a+1 .. b (process 0).

    Written to ``<run_dir>/profile`` (``plugins/profile/<time>/``: the XPlane file that
    TensorBoard's profile plugin reads and ``perfetto_trace.json.gz`` for ui.perfetto.dev). A
    run directory on an object store gets the files copied up when the trace stops.
    """

    def __init__(self, run_dir, steps, goodput: Goodput):
        self.steps = tuple(steps) if steps and _main() else None
        self.dst = run_dir / "profile"
        self.goodput = goodput
        self.local = None
        self.on = False

    def before_step(self, k: int) -> None:
        """Called with k finished steps, before step k+1 is dispatched."""
        if self.steps is None or self.on or not self.steps[0] <= k < self.steps[1]:
            return
        import tempfile

        from sessa_jax.paths import is_local
        with self.goodput.timing("profile"):
            self.local = (str(self.dst) if is_local(self.dst)
                          else tempfile.mkdtemp(prefix="sessa-profile-"))
            jax.profiler.start_trace(self.local, create_perfetto_trace=True)
            self.on = True
        say(f"profiling steps {k + 1}..{self.steps[1]} into {self.dst}")

    def after_step(self, k: int, state) -> None:
        if self.on and k >= self.steps[1]:
            self.stop(state)

    def stop(self, state=None) -> None:
        if not self.on:
            return
        from sessa_jax.paths import copy_tree, is_local
        with self.goodput.timing("profile"):
            if state is not None:
                jax.block_until_ready(state)  # the traced steps, not just their dispatch
            jax.profiler.stop_trace()
            self.on = False
            if not is_local(self.dst):
                import shutil
                copy_tree(self.local, self.dst)
                shutil.rmtree(self.local, ignore_errors=True)
        say(f"profile written to {self.dst} (tensorboard --logdir {self.dst}, or open "
            "plugins/profile/*/perfetto_trace.json.gz in ui.perfetto.dev)")


# -- evaluation -------------------------------------------------------------------------------


def run_eval(cfg: TrainConfig, task, setup: Setup, eval_step, params, *, split: str = "valid",
             max_batches: Optional[int] = None, goodput: Optional[Goodput] = None) -> dict:
    """One pass over the eval split -> summarize_eval metrics (+ 'batches')."""
    if goodput is not None:
        with goodput.timing("eval"):
            return run_eval(cfg, task, setup, eval_step, params, split=split,
                            max_batches=max_batches)
    g = cfg.run.global_batch_size
    sharding = batch_sharding(setup.mesh, cfg.mesh.sharding_rules())
    block, blocks = process_rows(sharding, (g, cfg.data.seq_len))
    n = num_eval_batches(cfg.data, g, split=split, task=task)
    limit = cfg.run.eval_batches if max_batches is None else max_batches
    if limit:
        n = min(n, limit)
    it = eval_batches(cfg.data, g, block, blocks, split=split, task=task)
    total = None
    for _ in range(n):
        sums = eval_step(params, global_batch(step_batch(next(it)), sharding, g))
        sums = {k: float(v) for k, v in jax.device_get(sums).items()}
        total = sums if total is None else {k: total[k] + sums[k] for k in total}
    out = summarize_eval(total)
    out["batches"] = n
    return out


def _better(value, best, mode: str) -> bool:
    if value is None:
        return False
    return best is None or (value > best if mode == "max" else value < best)


def _best_metric(cfg: TrainConfig) -> tuple[str, str]:
    if cfg.checkpoint.keep_best_metric:
        return cfg.checkpoint.keep_best_metric, cfg.checkpoint.keep_best_mode
    return ("loss", "min") if cfg.data.task == "text" else ("accuracy", "max")


# -- training ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Preflight:
    """What :func:`preflight` checked: the task (data readable), the mesh, the model setup."""

    cfg: TrainConfig
    task: object
    setup: Setup

    def describe(self) -> str:
        c = self.cfg
        return (f"ok: {c.model.family} model, {fmt_count(param_count(c.model))} parameters | "
                f"task {c.data.task}: {self.task.split_size('train'):,} train examples, "
                f"seq_len {c.data.seq_len} | {describe(self.setup.mesh)} | would write "
                f"{run_path(c)}")


def preflight(cfg: TrainConfig) -> Preflight:
    """Every check that needs no writing: the task and its data files, the mesh against the
    devices, the batch against the mesh, the model's abstract state. Raises ConfigError or
    DataError; creates nothing on disk."""
    task = task_for(cfg.data)
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    out = run_path(cfg)
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(
                f"run.output_dir={cfg.run.output_dir!r} exists and is not a directory")
    except OSError as e:  # e.g. an object store without credentials
        raise ConfigError(f"run.output_dir={cfg.run.output_dir!r}: cannot read it ({e})") from None
    return Preflight(cfg, task, make_setup(cfg, mesh))


def run_path(cfg: TrainConfig) -> epath.Path:
    """The run directory: ``run.output_dir`` as an epath.Path (a gs:// URI stays one)."""
    try:
        return user_path(cfg.run.output_dir)
    except PathError as e:
        raise ConfigError(f"run.output_dir: {e}") from None


def train(cfg: TrainConfig) -> RunResult:
    """Train (or resume) the run described by ``cfg``; see the module docstring.

    With several processes, call ``mesh.maybe_initialize_distributed()`` first (the CLI does),
    before anything else touches JAX. Raises ConfigError/DataError/CheckpointError for user
    mistakes and NonFiniteError when training diverges.
    """
    t_begin = time.perf_counter()
    try:
        set_compilation_cache(cfg.run.compilation_cache_dir)  # before anything compiles
    except PathError as e:
        raise ConfigError(f"run.compilation_cache_dir: {e}") from None
    pre = preflight(cfg)
    task, setup = pre.task, pre.setup
    run_dir = run_path(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"run.output_dir={cfg.run.output_dir!r}: cannot create it ({e})") from None
    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    writer = MetricsWriter(run_dir, enabled=_main(), tensorboard=cfg.run.tensorboard)
    goodput = Goodput(t_begin)
    try:
        return _train(cfg, run_dir, task, setup, ckpt, writer, t_begin, goodput)
    finally:
        goodput.close()
        ckpt.wait()
        ckpt.close()
        writer.close()


_SHARED_DIR_HINT = ("every process must see the same run.output_dir: a bucket (gs://...) or a "
                    "shared filesystem, not each host's local disk")


def _train(cfg, run_dir, task, setup, ckpt, writer, t_begin, goodput) -> RunResult:
    G, T, total = cfg.run.global_batch_size, cfg.data.seq_len, cfg.run.steps
    n_params = param_count(cfg.model)
    say(f"{cfg.model.family} model: {fmt_count(n_params)} parameters, d_model "
        f"{cfg.model.d_model}, {cfg.model.n_layers} layers | task {cfg.data.task}, seq_len {T}, "
        f"global batch {G} | {describe(setup.mesh)}")
    say(f"vocabulary: model.vocab_size {cfg.model.vocab_size}, data vocab_size "
        f"{task.vocab_size}" + (f" (tokenizer {cfg.data.text.tokenizer})"
                                if cfg.data.task == "text" else ""))

    # Fresh start or resume: every process from the same step.
    steps = ckpt.steps()
    same_on_all_processes(steps[-1] if steps else -1, "the newest checkpoint step",
                          _SHARED_DIR_HINT)
    if steps:
        meta, _ = ckpt.read_meta()
        changed = check_resume_compatible(config_from_meta(meta), cfg)
        if changed:
            say("resuming with changed execution settings (the parameters are the same): "
                + ", ".join(changed))
        state, meta, start = ckpt.restore(abstract_with_shardings(setup))
        same_on_all_processes(start, "the step to resume from", _SHARED_DIR_HINT)
        writer.truncate_after(start)
        say(f"resumed from step {start} ({ckpt.directory})")
    else:
        state, start = init_state(setup), 0
    if _main():
        save_config(cfg, run_dir / "config.yaml")

    train_step = make_train_step(cfg, setup)
    eval_step = make_eval_step(cfg, setup, token_byte_lengths(task))
    stats_step = make_stats_step(cfg, setup)  # None unless run.stability_stats (Sessa only)
    sharding = batch_sharding(setup.mesh, cfg.mesh.sharding_rules())
    block, blocks = process_rows(sharding, (G, T))
    it = batches(cfg.data, "train", G, start_step=start, process_index=block,
                 process_count=blocks, task=task)
    peak = peak_flops(device_kind(setup.mesh))
    thr = Throughput(G * T, flops_per_token(cfg.model, T, n_params),
                     peak * setup.mesh.devices.size if peak else None, total)
    best_name, best_mode = _best_metric(cfg)
    track = {"skipped": int(jax.device_get(state.skipped)),  # earlier sessions' too
             "compile_sec": None, "last_eval": None, "last_eval_step": None,
             "best": None, "best_step": None, "t_start": time.perf_counter()}

    def handle(k: int, m, evaluate: bool, force_log: bool = False) -> Optional[dict]:
        m = {key: float(v) for key, v in jax.device_get(m).items()}
        track["skipped"] += int(m["skipped"])
        if track["compile_sec"] is None:
            track["compile_sec"] = time.perf_counter() - track["t_start"]
            thr.start(k)
        log = force_log or evaluate or bool(logged_step(cfg, k))
        rec = None
        if log:
            # NaN: a step logged only because of a stop signal (accuracy not computed there)
            acc = m["accuracy"] if math.isfinite(m["accuracy"]) else None
            rec = {"step": k, "loss": m["loss"], "accuracy": acc,
                   "grad_norm": m["grad_norm"], "learning_rate": m["learning_rate"]}
            rec.update(thr.report(k))
            rec["skipped_total"] = track["skipped"]
            rec.update({key: v for key, v in m.items() if key.startswith("stability/")})
            rec["time"] = time.perf_counter() - t_begin
        ev = None
        if evaluate:
            ev = run_eval(cfg, task, setup, eval_step, state_ref[0].params, goodput=goodput)
            track["last_eval"], track["last_eval_step"] = ev, k
            if _better(ev.get(best_name), track["best"], best_mode):
                track["best"], track["best_step"] = ev[best_name], k
            rec.update({f"eval/{name}": val for name, val in ev.items() if name != "batches"})
            thr.start(k)  # leave eval time out of the next throughput window
        if rec is not None:
            writer.write(rec)
            say(progress_line(k, total, rec))
        if m["streak"] >= cfg.run.max_nonfinite_in_a_row:
            raise NonFiniteError(
                f"stopping at step {k}: {int(m['streak'])} steps in a row had a non-finite loss, "
                "gradient or update "
                f"(run.max_nonfinite_in_a_row={cfg.run.max_nonfinite_in_a_row}); "
                f"updates were skipped, last loss {m['loss']}, lr {m['learning_rate']:.3g} — "
                "lower optimizer.lr, keep optimizer.grad_clip_norm on, or check the data"
            )
        return ev

    for rec in writer.history():  # a resumed run keeps the best eval of earlier sessions
        if _better(rec.get(f"eval/{best_name}"), track["best"], best_mode):
            track["best"], track["best_step"] = rec[f"eval/{best_name}"], rec["step"]

    state_ref = [state]  # handle() evaluates the params of the newest state
    stopped_by = None
    k, pending, last_out = start, None, None
    sleep = float(os.environ.get("SESSA_DEBUG_STEP_SLEEP", "0") or 0)
    profile = Profile(run_dir, cfg.run.profile_steps, goodput)
    goodput.add("setup", t_begin, time.perf_counter())
    try:
        with StopSignals(cfg.run.stop_check_every) as signals:
            while k < total:
                if sleep:
                    time.sleep(sleep)
                profile.before_step(k)
                t_fetch = time.perf_counter()
                batch = global_batch(step_batch(next(it)), sharding, G)
                goodput.stall(goodput.add("data", t_fetch, time.perf_counter()), last_out)
                # the forward pass of the step about to be logged, before its update (donation)
                log_next = (k + 1) % cfg.run.log_every == 0 or k + 1 == total
                st = stats_step(state.params, batch) if stats_step and log_next else None
                new_state, m = train_step(state, batch)
                last_out = next(iter(jax.tree.leaves(m)), None)  # ready when the step is done
                if st is not None:
                    m = {**m, **st}
                state, k = new_state, k + 1  # together: (k, state) is always a finished step
                state_ref[0] = state
                profile.after_step(k, state)
                if pending is not None:
                    handle(*pending, evaluate=False)
                    pending = None
                is_save = k == total or bool(cfg.checkpoint.every_steps
                                             and k % cfg.checkpoint.every_steps == 0)
                is_eval = k == total or bool(cfg.run.eval_every and k % cfg.run.eval_every == 0)
                is_eval |= is_save and cfg.checkpoint.keep_best_metric is not None  # rank saves
                stopped_by = signals.requested(k, force=is_save)
                if is_eval or is_save or stopped_by:
                    ev = handle(k, m, evaluate=bool(is_eval), force_log=bool(stopped_by))
                    with goodput.timing("checkpoint"):
                        ckpt.save(k, state, cfg, metrics=ev)
                        writer.flush()  # an object store's metrics.jsonl keeps up with saves
                    if stopped_by:
                        with goodput.timing("checkpoint"):
                            ckpt.wait()
                        # every process says it: each host's log shows the step it saved
                        who = (f"process {jax.process_index()}: " if jax.process_count() > 1
                               else "")
                        print(f"{who}{stopped_by}: saved checkpoint at step {k} in "
                              f"{ckpt.directory}; run the same command again to resume",
                              flush=True)
                        break
                else:
                    pending = (k, m)
            if pending is not None:
                handle(*pending, evaluate=False)
    except Exception as e:
        profile.stop()
        _save_before_failing(ckpt, cfg, k, start, state, e)
        raise
    profile.stop(state)
    with goodput.timing("checkpoint"):
        ckpt.wait()  # the last save is part of this session's time
    if start >= total and track["last_eval"] is None:
        say(f"run already complete at step {start}/{total}: evaluating only")
        track["last_eval"], track["last_eval_step"] = run_eval(
            cfg, task, setup, eval_step, state.params, goodput=goodput), start

    summary = _summary(cfg, track, k, start, t_begin, best_name, best_mode)
    summary["goodput"] = goodput.report((k - start) * G * T, thr.flops_per_token,
                                        thr.peak_total)
    summary["compile_sec"] = summary["goodput"]["compile_sec"]
    summary["stopped_by"] = stopped_by
    summary["skipped_records"] = int(getattr(task, "skipped_records", 0))
    if _main():
        write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        _print_summary(summary, cfg, run_dir)
    return RunResult(summary, stopped_by)


def _save_before_failing(ckpt, cfg, k: int, start: int, state, err: BaseException) -> None:
    """After an exception in the loop: save step ``k`` (the last finished one) if its state is
    intact, so that no finished step is lost; then the caller re-raises. One process only
    (with several, the others may be stuck in a collective and a save would hang)."""
    if k <= start or jax.process_count() > 1:
        return
    what = type(err).__name__
    try:
        leaves = jax.tree.leaves(state)
        if any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            say(f"{what}: the state of step {k} was lost with the failed step; the newest "
                f"checkpoint in {ckpt.directory} is the last good one")
            return
        from sessa_jax.train.integrity import digests
        if digests(state.params)[1]:
            say(f"{what}: not saving step {k}: its parameters are non-finite")
            return
        ckpt.wait()
        saved = ckpt.save(k, state, cfg)
        ckpt.wait()
        say(f"{what}: " + ("saved a" if saved else "kept the")
            + f" checkpoint of step {k}, the last completed step, in {ckpt.directory}; fix the "
            "problem and run the same command again to resume")
    except Exception as e2:  # report the original error, not this one
        say(f"{what}: could not save step {k} before stopping ({type(e2).__name__}: {e2})")


def _summary(cfg, track, k, start, t_begin, best_name, best_mode) -> dict:
    tokens = k * cfg.run.global_batch_size * cfg.data.seq_len
    return {
        "steps": k,
        "steps_this_session": k - start,
        "tokens_seen": tokens,
        "wall_time_sec": time.perf_counter() - t_begin,
        "compile_sec": track["compile_sec"],
        "skipped_steps": track["skipped"],
        "final_eval_step": track["last_eval_step"],
        "final_eval": track["last_eval"],
        "best_eval": ({"metric": best_name, "mode": best_mode, "value": track["best"],
                       "step": track["best_step"]} if track["best"] is not None else None),
        "task": cfg.data.task,
        "chance_accuracy": chance_accuracy(cfg.data),
    }


def _print_summary(s: dict, cfg: TrainConfig, run_dir) -> None:
    print("-" * 72)
    print(f"trained {s['steps_this_session']} steps this session (step {s['steps']}/"
          f"{cfg.run.steps}), {fmt_count(s['tokens_seen'])} tokens seen in total, wall time "
          f"{fmt_duration(s['wall_time_sec'])}"
          + (f", {s['skipped_steps']} non-finite steps skipped" if s["skipped_steps"] else "")
          + (f", {s['skipped_records']} unreadable data records skipped "
             "(data.on_bad_record=skip)" if s.get("skipped_records") else ""))
    if s.get("stopped_by"):
        print(f"stopped by {s['stopped_by']} at step {s['steps']}/{cfg.run.steps}: run the same "
              "command again to resume")
    ev = s["final_eval"]
    if ev:
        chance = s["chance_accuracy"]
        parts = [f"accuracy {ev['accuracy']:.1%}" + (f" (chance {chance:.1%})" if chance else ""),
                 f"sequence accuracy {ev['seq_accuracy']:.1%}", f"loss {ev['loss']:.4f}"]
        if "bits_per_byte" in ev:
            parts += [f"perplexity {ev['perplexity']:.3f}", f"bits/byte {ev['bits_per_byte']:.4f}"]
        # After an interrupt the newest eval is a periodic one, not the end-of-run eval.
        label = (f"last eval before the {s['stopped_by']} (step {s['final_eval_step']}"
                 if s.get("stopped_by") else f"final eval (step {s['final_eval_step']}")
        print(f"{label}, {ev['examples']} held-out examples): " + ", ".join(parts))
    b = s["best_eval"]
    if b:
        v = b["value"]
        shown = f"{v:.1%}" if "accuracy" in b["metric"] else f"{v:.4f}"
        print(f"best eval {b['metric']}: {shown} at step {b['step']}")
    if s.get("goodput"):
        print(goodput_line(s["goodput"]))
    print(f"run directory: {run_dir}")


# -- evaluating a saved checkpoint ------------------------------------------------------------

# What sessa-eval may change: data (e.g. another seq_len), batch/eval size, mesh, execution.
_EVAL_OVERRIDABLE = ("data.", "mesh.", "run.global_batch_size", "run.eval_batches",
                     "run.compute_dtype", *(f"model.{f}" for f in EXECUTION_FIELDS),
                     "model.scan_layers")


def evaluate_checkpoint(run_dir: str, step: Optional[int] = None,
                        overrides: Sequence[str] = (), split: str = "valid") -> dict:
    """Evaluate checkpoint ``step`` (default newest readable) of ``run_dir`` -> metrics dict.

    ``overrides`` (key=value) may change data.* (e.g. ``data.seq_len=1024`` to test length
    generalisation), mesh.*, run.global_batch_size/eval_batches and execution-only model fields.
    The checkpoint is evaluated on the mesh it was trained on (its parameters placed as in
    training: a model sharded over fsdp/tensor is never gathered onto fewer devices); where
    that mesh does not fit the devices here (or the eval batch), on a data-parallel one over
    all devices, with a line on stderr saying so. The result names the mesh used.
    """
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if not key.startswith(_EVAL_OVERRIDABLE):
            raise ConfigError(f"{key}: cannot be changed when evaluating a checkpoint (it is "
                              "fixed by the trained model); allowed: data.*, mesh.*, "
                              "run.global_batch_size, run.eval_batches, model.dtype, ...")
    ckpt = Checkpointer(run_dir, read_only=True)
    meta, _ = ckpt.read_meta(step)
    raw = meta["config"]
    cfg = from_dict(apply_overrides(raw, overrides))  # the training mesh (+ mesh.* overrides)
    set_compilation_cache(cfg.run.compilation_cache_dir)  # the run's, if it had one
    task = task_for(cfg.data)
    try:
        if task.split_size(split) < 1:
            raise ValueError(f"split {split!r} is empty")
    except ValueError as e:
        raise ConfigError(f"--split {split}: {e}") from None

    def eval_mesh(c):
        m = make_mesh(c.mesh)
        check_batch(dataclasses.replace(c, optimizer=dataclasses.replace(
            c.optimizer, grad_accum_steps=1)), m)
        return m

    try:
        mesh = eval_mesh(cfg)
    except ConfigError as e:
        if any(o.split("=", 1)[0].strip().startswith("mesh.") for o in overrides):
            raise  # a mesh asked for explicitly: its error, not another mesh
        dp = {"data": -1, "fsdp": 1, "tensor": 1, "rules": raw["mesh"].get("rules", {})}
        cfg = from_dict(apply_overrides({**raw, "mesh": dp}, overrides))
        mesh = eval_mesh(cfg)
        if _main():
            print(f"sessa-eval: the training mesh does not fit here ({e}); evaluating "
                  f"data-parallel over {mesh.devices.size} device"
                  f"{'s' if mesh.devices.size > 1 else ''}", file=sys.stderr, flush=True)
    setup = make_setup(cfg, mesh)
    abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            setup.abstract.params, setup.shardings.params)
    params, _, s = ckpt.restore_params(abstract, step)
    eval_step = make_eval_step(cfg, setup, token_byte_lengths(task))
    ev = run_eval(cfg, task, setup, eval_step, params, split=split)
    result = {"step": s, "split": split, "task": cfg.data.task, "seq_len": cfg.data.seq_len,
              "mesh": {a: int(mesh.shape[a]) for a in ("data", "fsdp", "tensor")}, **ev}
    if _main():
        append_text(ckpt.run_dir / "eval_results.jsonl",
                    json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in result.items()}) + "\n")
    return result
