"""Typed training configuration, and a generic YAML loader with ``key.sub=value`` overrides.

A run is described by one :class:`TrainConfig`: nested frozen dataclasses ``model``
(:class:`~sessa_jax.models.config.ModelConfig`), ``data`` (:class:`~sessa_jax.data.DataConfig`),
``optimizer``, ``mesh``, ``checkpoint`` and ``run``. YAML files are read with ``yaml.safe_load``
only; the loader walks the dataclass type hints, so every key is checked against a field:

- unknown key:  ``unknown key 'optimizer.lrr' — did you mean 'optimizer.lr'?``
- wrong type:   ``run.steps: expected int, got 'ten'``
- bad value:    the dataclass's own ``__post_init__`` message, prefixed with its path.

``model`` may also be a string: the path of a flat ModelConfig YAML (``configs/models/*.yaml``),
resolved relative to the including file, then to the working directory; or a mapping with
``base: <that path>`` and fields that override the file's. ``model.vocab_size``
0 or omitted takes the task's vocabulary size — for text the tokenizer's, padded up to a
multiple of 128 (``padded_vocab``; read from the tokenizer file, the corpus is not touched:
the task is built when training starts, see :func:`task_for`). Every problem raises
:class:`ConfigError` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import types
import typing
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

from sessa_jax.data import DataConfig, make_task, task_vocab_size
from sessa_jax.data.tokenizer import padded_vocab
from sessa_jax.models.config import ModelConfig

_DTYPES = ("float32", "bfloat16", "float16", "float64")


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the key."""


# -- the dataclasses ----------------------------------------------------------------------------


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: expected {expected}")


def _check_uri(key: str, value) -> None:
    """A path setting: local, or a URI whose scheme etils.epath knows (gs://, s3://, ...)."""
    from sessa_jax.paths import SCHEMES, scheme
    s = scheme(value)
    if s not in (None, "file") and s not in SCHEMES:
        raise ValueError(f"{key}={value!r}: expected a local path or a URI with one of the "
                         "schemes " + ", ".join(f"{x}://" for x in SCHEMES))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    """A finite int or float (not a bool): NaN and inf are never valid settings."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return isinstance(v, int) or math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio`` at ``run.steps``.

    Weight decay skips biases, LayerNorm parameters, embeddings, Mamba's A_log/D and every
    0/1-D parameter. ``grad_clip_norm`` 0 disables clipping. ``grad_accum_steps`` splits each
    global batch into that many microbatches (same result as one big batch, less memory).
    """

    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        p = "optimizer"
        _check(_is_num(self.lr) and self.lr > 0, f"{p}.lr", self.lr, "a finite number > 0")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, f"{p}.warmup_steps",
               self.warmup_steps, "an integer >= 0")
        _check(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, f"{p}.min_lr_ratio",
               self.min_lr_ratio, "a number in [0, 1]")
        for f in ("b1", "b2"):
            v = getattr(self, f)
            _check(_is_num(v) and 0 <= v < 1, f"{p}.{f}", v, "a number in [0, 1)")
        _check(_is_num(self.eps) and self.eps >= 0, f"{p}.eps", self.eps, "a number >= 0")
        _check(_is_num(self.weight_decay) and self.weight_decay >= 0, f"{p}.weight_decay",
               self.weight_decay, "a number >= 0")
        _check(_is_num(self.grad_clip_norm) and self.grad_clip_norm >= 0, f"{p}.grad_clip_norm",
               self.grad_clip_norm, "a number >= 0 (0 = no clipping)")
        _check(_is_int(self.grad_accum_steps) and self.grad_accum_steps >= 1,
               f"{p}.grad_accum_steps", self.grad_accum_steps, "a positive integer")


MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor). One size may be -1: all remaining devices.

    ``rules`` overrides entries of :data:`sessa_jax.models.partitioning.DEFAULT_RULES`:
    logical axis name -> mesh axis name, list of mesh axis names, or null (replicated).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        for a, v in sizes.items():
            _check(_is_int(v) and (v >= 1 or v == -1), f"mesh.{a}", v,
                   "a positive integer or -1 (all remaining devices)")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ValueError(
                "mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1, got "
                + ", ".join(f"{a}={v}" for a, v in sizes.items())
            )
        if not isinstance(self.rules, Mapping):
            raise ValueError(f"mesh.rules={self.rules!r}: expected a mapping of logical axis names")
        from sessa_jax.models.partitioning import DEFAULT_RULES

        for name, axes in self.rules.items():
            if name not in DEFAULT_RULES:
                hint = difflib.get_close_matches(str(name), list(DEFAULT_RULES), n=1)
                raise ValueError(
                    f"unknown key 'mesh.rules.{name}'"
                    + (f" — did you mean 'mesh.rules.{hint[0]}'?" if hint else
                       f": logical axes are {', '.join(DEFAULT_RULES)}")
                )
            tup = [] if axes is None else [axes] if isinstance(axes, str) else axes
            if not isinstance(tup, (list, tuple)) or any(a not in MESH_AXES for a in tup):
                raise ValueError(
                    f"mesh.rules.{name}={axes!r}: expected null, one of {', '.join(MESH_AXES)} "
                    "or a list of them"
                )

    def sharding_rules(self) -> dict:
        """DEFAULT_RULES with this config's overrides (lists become tuples)."""
        from sessa_jax.models.partitioning import DEFAULT_RULES

        rules = dict(DEFAULT_RULES)
        for name, axes in self.rules.items():
            rules[name] = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        return rules


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<run.output_dir>/checkpoints``.

    Saves every ``every_steps`` steps (0: only at the end and on SIGTERM/SIGINT), keeps the
    last ``keep_last`` plus the best one by ``keep_best_metric`` (an eval metric name such as
    ``accuracy``, ``seq_accuracy`` or ``loss``; null: no best tracking) in ``keep_best_mode``.
    ``async_save`` writes in the background while training goes on.
    """

    every_steps: int = 1000
    keep_last: int = 3
    keep_best_metric: Optional[str] = None
    keep_best_mode: Literal["max", "min"] = "max"
    async_save: bool = True

    def __post_init__(self):
        p = "checkpoint"
        _check(_is_int(self.every_steps) and self.every_steps >= 0, f"{p}.every_steps",
               self.every_steps, "an integer >= 0 (0 = only at the end)")
        _check(_is_int(self.keep_last) and self.keep_last >= 1, f"{p}.keep_last",
               self.keep_last, "a positive integer")
        _check(self.keep_best_mode in ("max", "min"), f"{p}.keep_best_mode",
               self.keep_best_mode, "'max' or 'min'")
        if self.keep_best_metric is not None and self.keep_best_metric not in EVAL_METRICS:
            raise ValueError(
                f"{p}.keep_best_metric={self.keep_best_metric!r}: expected one of "
                f"{', '.join(EVAL_METRICS)} or null"
            )


# Metric names an eval pass can produce (tasks: accuracy/seq_accuracy; text: ppl/bpb too).
EVAL_METRICS = ("loss", "accuracy", "seq_accuracy", "perplexity", "bits_per_byte")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The run itself: where it writes, how long, batch, logging and eval cadence.

    ``compute_dtype``/``param_dtype`` (null: keep the model's) set ModelConfig.dtype and
    .param_dtype, e.g. bfloat16 compute with float32 parameters. ``eval_every`` 0: eval only at
    the end; ``eval_batches`` 0: the whole ``data.num_eval_examples``. The loop stops with an
    error after ``max_nonfinite_in_a_row`` skipped (non-finite) updates in a row.
    ``stability_stats``: on logging steps, also log each Sessa layer's feedback statistics
    (``stability/layer<i>/...`` in metrics.jsonl; see sessa_jax/train/stability.py).

    ``output_dir`` and ``compilation_cache_dir`` are local paths or URIs (``gs://bucket/x``).
    ``compilation_cache_dir``: JAX's persistent compilation cache (null: none), so that a
    restarted or resumed run loads its compiled steps instead of compiling them again.
    ``stop_check_every``: with several processes, how often (in steps) they agree whether one
    of them got SIGTERM/SIGINT (also at every checkpoint step); one process checks every step
    and never needs a collective. ``profile_steps`` [a, b]: a ``jax.profiler`` trace of steps
    a+1 .. b into ``<output_dir>/profile`` (TensorBoard's profile plugin, or Perfetto:
    ``perfetto_trace.json.gz``); 0 <= a < b <= steps.
    """

    output_dir: str = "runs/default"
    steps: int = 1000
    global_batch_size: int = 32
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 0
    max_nonfinite_in_a_row: int = 5
    compute_dtype: Optional[str] = None
    param_dtype: Optional[str] = None
    tensorboard: bool = True
    stability_stats: bool = False
    compilation_cache_dir: Optional[str] = None
    stop_check_every: int = 10
    profile_steps: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        p = "run"
        if self.compilation_cache_dir is not None:
            _check(isinstance(self.compilation_cache_dir, str) and bool(self.compilation_cache_dir),
                   f"{p}.compilation_cache_dir", self.compilation_cache_dir,
                   "null or a non-empty path (local or gs://...)")
            _check_uri(f"{p}.compilation_cache_dir", self.compilation_cache_dir)
        _check(_is_int(self.stop_check_every) and self.stop_check_every >= 1,
               f"{p}.stop_check_every", self.stop_check_every, "a positive integer")
        if self.profile_steps is not None:
            ps = self.profile_steps
            if isinstance(ps, list):
                ps = tuple(ps)
                object.__setattr__(self, "profile_steps", ps)
            ok = (isinstance(ps, tuple) and len(ps) == 2 and all(_is_int(x) for x in ps)
                  and _is_int(self.steps) and 0 <= ps[0] < ps[1] <= self.steps)
            _check(ok, f"{p}.profile_steps", list(ps) if isinstance(ps, tuple) else ps,
                   f"null or [a, b] with 0 <= a < b <= run.steps={self.steps!r} (a trace of "
                   "steps a+1 .. b)")
        _check(isinstance(self.stability_stats, bool), f"{p}.stability_stats",
               self.stability_stats, "true or false")
        _check(isinstance(self.output_dir, str) and bool(self.output_dir), f"{p}.output_dir",
               self.output_dir, "a non-empty path")
        _check_uri(f"{p}.output_dir", self.output_dir)
        for f, lo in (("steps", 1), ("global_batch_size", 1), ("seed", 0), ("log_every", 1),
                      ("eval_every", 0), ("eval_batches", 0), ("max_nonfinite_in_a_row", 1)):
            v = getattr(self, f)
            _check(_is_int(v) and v >= lo, f"{p}.{f}", v,
                   "a positive integer" if lo == 1 else "an integer >= 0")
        for f in ("compute_dtype", "param_dtype"):
            v = getattr(self, f)
            if v is not None:
                _check(v in _DTYPES, f"{p}.{f}", v, f"null or one of {', '.join(_DTYPES)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; see the module docstring for loading rules."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def __post_init__(self):
        g, acc = self.run.global_batch_size, self.optimizer.grad_accum_steps
        if g % acc:
            raise ValueError(
                f"run.global_batch_size={g} is not divisible by optimizer.grad_accum_steps={acc}"
            )
        if self.run.compute_dtype and self.model.dtype != self.run.compute_dtype:
            raise ValueError(f"model.dtype={self.model.dtype!r} disagrees with "
                             f"run.compute_dtype={self.run.compute_dtype!r}")
        if self.run.param_dtype and self.model.param_dtype != self.run.param_dtype:
            raise ValueError(f"model.param_dtype={self.model.param_dtype!r} disagrees with "
                             f"run.param_dtype={self.run.param_dtype!r}")


# -- generic dataclass <-> dict -------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a)
                           for a in typing.get_args(tp))
    if origin is tuple:
        return "list of " + _type_name(typing.get_args(tp)[0])
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bad_type(key: str, tp, value):
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)}")


def _coerce(value, tp, key: str):
    """Check ``value`` against the type hint ``tp``; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _bad_type(key, tp, value)
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise _bad_type(key, tp, value)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _bad_type(key, tp, value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad_type(key, tp, value)
    if tp is int:
        if _is_int(value):
            return value
        # 1e6 in YAML is a string (YAML 1.1 wants 1.0e6); accept integral numbers either way.
        num = _as_float(value)
        if num is not None and math.isfinite(num) and num == int(num):
            return int(num)
        raise _bad_type(key, tp, value)
    if tp is float:
        num = _as_float(value)
        if num is None:
            raise _bad_type(key, tp, value)
        if not math.isfinite(num):  # '.nan', 'inf', 1e999: never a meaningful setting
            raise ConfigError(f"{key}: expected a finite number, got {_short(value)}")
        return num
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad_type(key, tp, value)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise _bad_type(key, tp, value)
        (elem,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(items))
    if origin is dict or tp is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise _bad_type(key, tp, value)
        return dict(value)
    return value


def _as_float(value) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond float range
            return math.inf
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _prefix_message(msg: str, prefix: str, names) -> str:
    """Dataclass errors name a bare field ('d_model=3 ...'); give it its full path."""
    if msg.startswith((prefix + ".", prefix + ":", "unknown key")):
        return msg
    head = msg.split("=", 1)[0].split(" ", 1)[0]
    if head in names:
        return f"{prefix}.{msg}"
    return f"{prefix}: {msg}"


def build(cls, raw, prefix: str = ""):
    """Build dataclass ``cls`` from a (nested) dict, checking keys and types; path ``prefix``."""
    if raw is None:
        raw = {}
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of {cls.__name__} fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            hint = difflib.get_close_matches(str(k), names, n=1)
            where = f"{prefix}." if prefix else ""
            raise ConfigError(
                f"unknown key {key!r}"
                + (f" — did you mean '{where}{hint[0]}'?" if hint else
                   f": {cls.__name__} has {', '.join(names)}")
            )
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(_prefix_message(str(e), prefix, names) if prefix else str(e)) from None


def to_dict(obj) -> Any:
    """Dataclass tree -> plain YAML-able values (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# -- YAML, overrides, model files ---------------------------------------------------------------


def _user_path(path, key: str):
    """:func:`sessa_jax.paths.user_path`, its error as a ConfigError naming ``key``."""
    from sessa_jax.paths import PathError, user_path
    try:
        return user_path(path)
    except PathError as e:
        raise ConfigError(f"{key}: {e}") from None


def read_yaml(path: str, what: str = "config") -> dict:
    """A YAML mapping from ``path`` (local or a URI); an empty file is an error (it would mean
    'all defaults', which silently trains a run nobody asked for)."""
    p = _user_path(path, f"{what} file")
    try:
        if not p.is_file():
            raise ConfigError(f"{what} file {path!r} not found")
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{what} file {path!r}: cannot read it ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} file {path!r} is not valid YAML: {e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        why = str(e).replace("\n", " ")
        raise ConfigError(f"{what} file {path!r} is not valid YAML: {why}") from None
    if raw is None:
        raise ConfigError(f"{what} file {path!r} is empty: expected a mapping of "
                          + ("model, data, optimizer, mesh, checkpoint, run settings"
                             if what == "config" else "settings"))
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} file {path!r}: expected a mapping at the top level, got "
                          f"{type(raw).__name__}")
    if any(not isinstance(k, str) for k in raw):
        bad = next(k for k in raw if not isinstance(k, str))
        raise ConfigError(f"{what} file {path!r}: key {bad!r} is not a string")
    return raw


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Set ``a.b.c=value`` entries in a nested dict (values parsed with yaml.safe_load)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. run.steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # e.g. an unquoted string with a colon: keep it as text
        node = raw
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if isinstance(nxt, str) and p == "model" and i == 0:
                nxt = _model_file(nxt, ".")  # model: path, then model.x=...: inline it first
            if nxt is None:
                nxt = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {item!r}: '{'.'.join(parts[:i + 1])}' is {nxt!r}, not a mapping"
                )
            node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return raw


def _model_file(path: str, base_dir: str) -> dict:
    """A flat ModelConfig YAML file, found relative to ``base_dir`` then the working dir (a
    URI, or a base_dir that is one, is joined as a URI)."""
    for cand in (_user_path(base_dir, "model") / path, _user_path(path, "model")):
        if cand.is_file():
            return read_yaml(str(cand), "model")
    raise ConfigError(f"model: model file {path!r} not found (looked in {base_dir!r} and the "
                      "working directory)")


@functools.lru_cache(maxsize=4)
def task_for(data_cfg: DataConfig):
    """The task of a DataConfig, built once (a text task reads its corpus when built)."""
    return make_task(data_cfg)


def _vocab_of(data: DataConfig) -> int:
    """The data's vocabulary: cheap, the corpus is not read (a bad tokenizer: DataError)."""
    return task_vocab_size(data)


def from_dict(raw: Mapping, base_dir: str = ".", check_task: bool = True) -> TrainConfig:
    """Resolve and validate a raw config dict (as read from YAML) into a TrainConfig.

    ``check_task`` False skips building the task to check ``model.vocab_size`` (used when
    reading a saved, already resolved config whose text corpus may have moved).
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping at the top level, got {raw!r}")
    raw = copy.deepcopy(dict(raw))
    model_raw = raw.get("model", {})
    if isinstance(model_raw, str):
        model_raw = _model_file(model_raw, base_dir)
    elif isinstance(model_raw, Mapping) and "base" in model_raw:
        # {base: model file, field: value, ...}: a sized model file plus execution knobs
        # (chunk_size, remat, ...) that the file, made by scripts/param_count.py, leaves out.
        extra = {k: v for k, v in model_raw.items() if k != "base"}
        if not isinstance(model_raw["base"], str):
            raise ConfigError(f"model.base: expected a model file path, got {model_raw['base']!r}")
        model_raw = {**_model_file(model_raw["base"], base_dir), **extra}
    if model_raw is None:
        model_raw = {}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"model: expected a mapping of ModelConfig fields or a model file "
                          f"path, got {model_raw!r}")
    run = build(RunConfig, raw.get("run"), "run")
    for src, dst in (("compute_dtype", "dtype"), ("param_dtype", "param_dtype")):
        if getattr(run, src):
            model_raw[dst] = getattr(run, src)
    data = build(DataConfig, raw.get("data"), "data")
    vocab = model_raw.get("vocab_size")
    if vocab in (None, 0):
        need = _vocab_of(data)
        model_raw["vocab_size"] = padded_vocab(need) if data.task == "text" else need
    model = build(ModelConfig, model_raw, "model")
    if vocab not in (None, 0) and check_task:
        need = _vocab_of(data)
        if model.vocab_size < need:
            raise ConfigError(
                f"model.vocab_size={model.vocab_size} is smaller than the vocabulary of "
                f"data.task={data.task!r} ({need} ids); set it to 0 or omit it to use the task's"
            )
    full = dict(raw)
    full.update(model=model, data=data, run=run)
    return build(TrainConfig, full, "")


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML; None: all defaults), apply ``key=value`` overrides, validate."""
    raw = read_yaml(path) if path else {}
    base_dir = str(_user_path(path, "config file").parent) if path else "."
    if isinstance(raw.get("model"), str) and any(o.startswith("model.") for o in overrides):
        raw["model"] = _model_file(raw["model"], base_dir)
    return from_dict(apply_overrides(raw, overrides), base_dir)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: TrainConfig, path) -> None:
    """Write the resolved config (every field, model inlined) as YAML (local or a URI)."""
    from sessa_jax.paths import write_text
    write_text(path, dump_yaml(cfg))


def replace(cfg, **changes):
    """dataclasses.replace that re-validates, raising ConfigError."""
    try:
        return dataclasses.replace(cfg, **changes)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


# Fields that must match for a run directory to be resumed (performance knobs may differ).
_DATA_FREE = ("num_threads", "prefetch", "on_bad_record")
# The parameter layout: a checkpoint converts on restore (train/checkpoint.py).
_MODEL_FREE = ("scan_layers",)

# ModelConfig fields that change how the model runs, never its parameters (their shapes,
# names or dtype): a resume, sessa-eval and an export may set them anew. param_dtype and every
# architecture field are not in this list.
EXECUTION_FIELDS = ("attention_impl", "feedback_impl", "chunk_size", "feedback_segments",
                    "feedback_inverse", "feedback_unroll", "scan_impl", "ssm_chunk_size", "ssd_chunk_size",
                    "ssd_impl", "remat", "layer_remat", "loss_chunk_size", "dtype")


def check_resume_compatible(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """Raise ConfigError naming the first model/data field that differs and would change the
    parameters or the data; return the execution settings that changed, as
    ``"model.remat 'none' -> 'full'"`` (the caller says so)."""
    changed = []
    for section in ("model", "data"):
        a, b = to_dict(getattr(saved, section)), to_dict(getattr(new, section))
        for k in a:
            if k in {"data": _DATA_FREE, "model": _MODEL_FREE}[section]:
                continue
            if a[k] == b.get(k):
                continue
            if section == "model" and k in EXECUTION_FIELDS:
                changed.append(f"model.{k} {a[k]!r} -> {b.get(k)!r}")
                continue
            raise ConfigError(
                f"{section}.{k}={b.get(k)!r} differs from the run being resumed "
                f"({section}.{k}={a[k]!r}); use a new run.output_dir or the same value"
                + (" (it changes the parameters; execution settings such as "
                   + ", ".join(f"model.{f}" for f in EXECUTION_FIELDS[:4])
                   + " may change)" if section == "model" else "")
            )
    return changed
