"""Parameter export (safetensors, sharded by size) and :func:`load_pretrained`."""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping, Optional

import jax
import numpy as np
from etils import epath

from sessa_jax.paths import PathError, PathLike, is_local, local_copy, user_path

FORMAT = "sessa_jax.export.v1"
CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class ExportError(ValueError):
    """A bad export directory or a mismatch between its tensors and its config."""


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with user_path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_readable(path: PathLike) -> None:
    """Mode 0644: exports are shared (safetensors writes its files 0600). Object stores have
    no modes: nothing to do there."""
    if is_local(path):
        os.chmod(path, 0o644)


def out_path(path: PathLike) -> epath.Path:
    """An export's output or input directory as an epath.Path (ExportError for a bad URI)."""
    try:
        return user_path(path)
    except PathError as e:
        raise ExportError(str(e)) from None


def save_safetensors(tensors: Mapping[str, np.ndarray], path: PathLike, metadata: dict) -> None:
    """safetensors.numpy.save_file, also to an object store (serialized in memory, one write)."""
    from safetensors.numpy import save, save_file

    if is_local(path):
        save_file(dict(tensors), os.fspath(path), metadata=metadata)
    else:
        user_path(path).write_bytes(save(dict(tensors), metadata=metadata))


def check_finite(name: str, a: np.ndarray, where: str) -> None:
    """Raise ExportError if a floating-point tensor holds NaN/inf."""
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        bad = int(a.size - np.count_nonzero(np.isfinite(a.astype(np.float32))))
        if bad:
            raise ExportError(f"{where}: tensor {name} holds {bad} non-finite values (NaN/inf); "
                              "refusing these weights")


def parse_size(size) -> int:
    """'2GB' (10^9), '500MiB' (2^20), '1234' -> bytes."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise ExportError(f"max shard size {size!r}: expected e.g. 2GB, 500MB, 1GiB or bytes")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ExportError(f"max shard size {size!r} must be positive")
    return n


def _key_name(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", k)))


def flatten_params(params) -> dict[str, Any]:
    """Nested params (nnx.to_pure_dict layout) -> {'blocks.0.mixer.W_in.kernel': array}."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def plan_shards(tensors: Mapping[str, Any], limit: int) -> list[list[str]]:
    """Greedy split in the mapping's order; a tensor above the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += a.nbytes
    return shards


def remove_old_shards(out_dir: PathLike) -> None:
    """A re-export must not leave stale shards behind."""
    for old in user_path(out_dir).iterdir():
        if old.name.endswith(".safetensors") or old.name == INDEX_NAME:
            old.unlink()


def mismatch_listing(missing, unexpected, bad) -> str:
    """The missing / unexpected / wrong-shape lines of a checkpoint that does not fit a model."""
    parts = []
    if missing:
        parts.append(f"missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        parts.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if bad:
        parts.append(f"wrong shape ({len(bad)}): " + "; ".join(bad))
    return "\n  ".join(parts)


# -- writing ---------------------------------------------------------------------------------------


def export_params(params, model_cfg, out_dir: str, *, dtype: str = "fp32",
                  max_shard_size="2GB", extra: Optional[dict] = None) -> dict:
    """Write ``params`` (pure dict of a DecoderLM(model_cfg)) to ``out_dir``.

    Returns a summary: files, total_bytes, n_tensors, n_params, dtype.
    """
    import dataclasses

    from sessa_jax.train.config import to_dict

    from sessa_jax.models.layout import unstack_layers

    if dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected bf16 or fp32")
    np_dtype = np.dtype(jax.numpy.dtype(_DTYPES[dtype]))
    limit = parse_size(max_shard_size)
    tensors = {}
    # Per-layer names (blocks.0...) whatever model.scan_layers was: the files do not depend on it.
    for name, arr in flatten_params(unstack_layers(params)).items():
        a = np.asarray(jax.device_get(arr))
        check_finite(name, a, "export")
        if np.issubdtype(a.dtype, np.floating) or a.dtype == np_dtype:
            a = a.astype(np_dtype)
        tensors[name] = np.array(a, order="C")  # (ascontiguousarray makes 0-d 1-d)

    shards = plan_shards(tensors, limit)
    out = out_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_old_shards(out)
    meta = {"format": FORMAT}
    n = len(shards)
    files = []
    weight_map = {}
    for i, names in enumerate(shards):
        fname = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_safetensors({k: tensors[k] for k in names}, out / fname, meta)
        make_readable(out / fname)
        files.append(fname)
        weight_map.update({k: fname for k in names})
    total = sum(a.nbytes for a in tensors.values())
    if n > 1:
        (out / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total, "format": FORMAT},
                        "weight_map": weight_map}, indent=1, sort_keys=True), encoding="utf-8")
        make_readable(out / INDEX_NAME)

    model_dict = to_dict(dataclasses.replace(model_cfg, scan_layers=False))
    if _DTYPES[dtype] != "float32":  # the loaded model holds the parameters in this dtype
        model_dict["param_dtype"] = _DTYPES[dtype]
    config = {"format": FORMAT, "model": model_dict, "export_dtype": _DTYPES[dtype],
              "n_params": int(sum(a.size for a in tensors.values())),
              # load_pretrained verifies these: a damaged file is refused, not loaded
              "sha256": {f: file_sha256(out / f) for f in files}}
    config.update(extra or {})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1), encoding="utf-8")
    make_readable(out / CONFIG_NAME)
    return {"files": files, "total_bytes": total, "n_tensors": len(tensors),
            "n_params": config["n_params"], "dtype": _DTYPES[dtype], "out_dir": out_dir}


def export_run(run_dir: str, out_dir: str, *, step: Optional[int] = None, dtype: str = "fp32",
               max_shard_size="2GB") -> dict:
    """Export the parameters of checkpoint ``step`` (default: newest) of a training run."""
    from sessa_jax.train.checkpoint import load_params_host

    if not out_path(run_dir).is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    if dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected bf16 or fp32")
    parse_size(max_shard_size)
    out_path(out_dir)
    params, cfg, s = load_params_host(run_dir, step)  # host memory only, never a device
    summary = export_params(
        params, cfg.model, out_dir, dtype=dtype, max_shard_size=max_shard_size,
        extra={"step": int(s), "source_run": str(out_path(run_dir)),
               "sharding_rules": {k: (list(v) if isinstance(v, tuple) else v)
                                  for k, v in cfg.mesh.rules.items()}})
    summary["step"] = int(s)
    return summary


# -- reading ---------------------------------------------------------------------------------------


def read_export_config(path: str):
    """-> (ModelConfig, the raw config.json dict); ExportError when missing or invalid."""
    from sessa_jax.models.config import ModelConfig
    from sessa_jax.train.config import ConfigError, build

    if not out_path(path).is_dir():
        raise ExportError(f"{path}: no such export directory")
    cpath = out_path(path) / CONFIG_NAME
    if not cpath.is_file():
        raise ExportError(f"{path}: no {CONFIG_NAME} (is this a sessa-export directory?)")
    raw = json.loads(cpath.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or "model" not in raw:
        raise ExportError(f"{cpath}: not a {FORMAT!r} config")
    try:
        return build(ModelConfig, raw["model"], "model"), raw
    except ConfigError as e:
        raise ExportError(f"{cpath}: {e}") from None


def _tensor_files(path: str) -> dict[str, str]:
    """{tensor name: file} from the index, or the single file."""
    from safetensors import safe_open

    base = out_path(path)
    ipath = base / INDEX_NAME
    if ipath.is_file():
        wm = json.loads(ipath.read_text(encoding="utf-8")).get("weight_map", {})
        missing = sorted({v for v in wm.values() if not (base / v).is_file()})
        if missing:
            raise ExportError(f"{path}: shard files listed in {INDEX_NAME} are missing: "
                              + ", ".join(missing))
        return dict(wm)
    single = base / SINGLE_NAME
    if not single.is_file():
        raise ExportError(f"{path}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
    with local_copy(single) as local, safe_open(local, "numpy") as f:
        return {k: SINGLE_NAME for k in f.keys()}


def load_pretrained(path: str, mesh=None, rules: Optional[Mapping] = None):
    """Build the DecoderLM of an export directory, holding its parameters.

    ``mesh``: place each parameter with the NamedSharding its logical axes map to under
    ``rules`` (default: DEFAULT_RULES with the training run's overrides); a dimension the mesh
    axes do not divide is replicated. Without a mesh, parameters go to the default device.
    Raises ExportError naming every missing, unexpected or misshaped tensor, a file whose
    sha256 differs from config.json's, or a tensor holding NaN/inf.
    """
    import dataclasses

    from safetensors import safe_open
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sessa_jax.models.partitioning import DEFAULT_RULES, tree_logical_to_mesh
    from sessa_jax.train.mesh import fit_spec
    from sessa_jax.train.state import abstract_model

    model_cfg, raw = read_export_config(path)
    base = out_path(path)
    for fname, want_sha in (raw.get("sha256") or {}).items():  # before parsing any of them
        fpath = base / fname
        if fpath.is_file() and file_sha256(fpath) != want_sha:
            raise ExportError(f"{fpath}: sha256 does not match config.json (the file is damaged "
                              "or was changed after export); export it again")
    files = _tensor_files(path)
    # The files hold per-layer tensors; a config asking for scan_layers gets them stacked.
    model_def, abstract, logical = abstract_model(dataclasses.replace(model_cfg,
                                                                      scan_layers=False))
    want = flatten_params(abstract)

    shapes = {}
    for fname in sorted(set(files.values())):
        with local_copy(base / fname) as local, safe_open(local, "numpy") as f:
            for k in f.keys():
                if files.get(k) == fname:
                    shapes[k] = tuple(f.get_slice(k).get_shape())
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    bad = [f"{k}: expected {tuple(want[k].shape)}, got {shapes[k]}"
           for k in want if k in shapes and tuple(want[k].shape) != shapes[k]]
    if missing or unexpected or bad:
        raise ExportError(f"{path}: tensors do not match config.json's model\n  "
                          + mismatch_listing(missing, unexpected, bad))

    if mesh is not None:
        if rules is None:
            rules = dict(DEFAULT_RULES)
            for k, v in (raw.get("sharding_rules") or {}).items():
                rules[k] = tuple(v) if isinstance(v, list) else v
        is_spec = lambda x: isinstance(x, P)  # noqa: E731
        mesh_specs = tree_logical_to_mesh(logical, rules)
        shardings = flatten_params(jax.tree.map(
            lambda s, a: NamedSharding(mesh, fit_spec(s, a.shape, mesh)),
            mesh_specs, abstract, is_leaf=is_spec))
    else:
        shardings = {}

    loaded = {}
    for fname in sorted(set(files.values())):
        with local_copy(base / fname) as local, safe_open(local, "numpy") as f:
            for k in f.keys():
                if files.get(k) != fname:
                    continue
                a = f.get_tensor(k)
                check_finite(k, a, str(base / fname))
                dt = np.dtype(want[k].dtype)
                if a.dtype != dt:
                    a = a.astype(dt)
                loaded[k] = (jax.device_put(a, shardings[k]) if k in shardings
                             else jax.numpy.asarray(a))
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    params = jax.tree_util.tree_unflatten(treedef, [loaded[k] for k in want])
    if model_cfg.scan_layers:
        from sessa_jax.models.layout import stack_layers

        model_def, _, _ = abstract_model(model_cfg)
        params = stack_layers(params)  # (placement: the layers axis is never sharded)
    return model_def(params)
