"""Hugging Face / PyTorch export of a DecoderLM, and reading such a directory back.

    sessa-export --run runs/x --format hf --out exports/x-hf
    # then, anywhere with torch + transformers (pip install "sessa_jax[hf]" or just those two):
    AutoModelForCausalLM.from_pretrained("exports/x-hf", trust_remote_code=True)

A directory holds:

* ``model.safetensors`` (or ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``
  above ``max_shard_size``): PyTorch names and (out, in) layouts (see :mod:`hf_names`), metadata
  ``{"format": "pt", "sessa_jax": "sessa_jax.hf.v1"}``;
* ``config.json``: ``model_type`` ``sessa_jax``, ``architectures``, ``auto_map`` to the two
  shipped files, the architecture under Hugging Face's usual names (``hidden_size``,
  ``num_attention_heads`` ...), and the full ModelConfig under ``sessa_jax.model`` so that an
  import gets the execution settings (feedback_impl, chunk sizes ...) back too;
* ``configuration_sessa.py`` and ``modeling_sessa.py`` (copied from ``hf_files/``);
* the tokenizer when the run trained on text: ``sessa_tokenizer.json`` (its ids); for the byte
  tokenizer also ``tokenizer.json`` / ``tokenizer_config.json`` (``AutoTokenizer`` loads them),
  for a SentencePiece model its ``tokenizer.model``, for a Hugging Face one its ``tokenizer.json``.

Writing needs only NumPy and safetensors; loading the PyTorch model needs torch and transformers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from sessa_jax.export.core import ExportError, flatten_params, out_path, parse_size
from sessa_jax.paths import local_copy
from sessa_jax.export.hf_names import NameMismatchError, check_state, hf_entries, rename
from sessa_jax.models.config import ModelConfig

HF_FORMAT = "sessa_jax.hf.v1"
MODEL_TYPE = "sessa_jax"
CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "sessa_tokenizer.json"
CODE_FILES = ("configuration_sessa.py", "modeling_sessa.py")
HF_FILES_DIR = os.path.join(os.path.dirname(__file__), "hf_files")
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}

# ModelConfig field -> Hugging Face config name, for the fields that fix the tensors' shapes.
_ARCH = {
    "family": "family", "vocab_size": "vocab_size", "d_model": "hidden_size",
    "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads", "tie_embeddings": "tie_word_embeddings",
    "num_classes": "num_classes", "use_rope": "use_rope", "rope_base": "rope_theta",
    "ln_eps": "layer_norm_eps", "gamma_max": "gamma_max", "d_state": "state_size",
    "expand": "expand", "d_conv": "conv_kernel",
}


def hf_available() -> bool:
    """True when torch and transformers can be imported (the ``hf`` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def loading_hint() -> str:
    return ('loading it with transformers needs torch and transformers: '
            'pip install "sessa_jax[hf]" (or pip install torch transformers)')


# -- config ----------------------------------------------------------------------------------------


# Families the Hugging Face modeling file (hf_files/modeling_sessa.py) implements.
HF_FAMILIES = ("sessa", "transformer", "mamba")


def check_hf_family(cfg: ModelConfig) -> None:
    """ExportError for a family the modeling file lacks (it would load as another model)."""
    if cfg.family not in HF_FAMILIES:
        raise ExportError(
            f"model.family={cfg.family!r}: the Hugging Face modeling file implements "
            f"{', '.join(HF_FAMILIES)} only; export it in the native format instead "
            f"(sessa-export without --format hf)")


def hf_config(cfg: ModelConfig, *, dtype: str = "float32", tokenizer: Optional[dict] = None,
              extra: Optional[dict] = None) -> dict:
    """The config.json of an export of a DecoderLM(cfg)."""
    from sessa_jax.train.config import to_dict

    check_hf_family(cfg)
    if getattr(cfg, "feedback_qk_norm", False):
        raise ExportError("model.feedback_qk_norm=True: the Hugging Face modeling file has no "
                          "q_b/k_b norms, so it would compute another model; export without it")

    conf: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "architectures": ["SessaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sessa.SessaConfig",
                     "AutoModelForCausalLM": "modeling_sessa.SessaForCausalLM"},
    }
    for ours, theirs in _ARCH.items():
        conf[theirs] = getattr(cfg, ours)
    conf["num_key_value_heads"] = cfg.n_kv_heads or cfg.n_heads
    conf["intermediate_size"] = cfg.mlp_hidden  # SwiGLU width; 0 = no MLP blocks
    conf["time_step_rank"] = cfg.block_config().rank if cfg.family == "mamba" else None
    conf["dtype"] = conf["torch_dtype"] = dtype  # transformers 5 reads dtype, 4 torch_dtype
    tok = tokenizer or {}
    for name in ("pad", "bos", "eos"):
        conf[f"{name}_token_id"] = tok.get(f"{name}_id")
    model = to_dict(dataclasses.replace(cfg, scan_layers=False))  # the files are per layer
    if dtype != "float32":
        model["param_dtype"] = dtype
    conf["sessa_jax"] = {"format": HF_FORMAT, "model": model, **(extra or {})}
    return conf


def model_config_from_hf(raw: Mapping, where: str = CONFIG_NAME) -> ModelConfig:
    """ModelConfig of a Hugging Face config dict (ours, or a third party's of this architecture).

    The architecture comes from the Hugging Face names (they describe the tensors); the
    execution settings from ``sessa_jax.model`` when present, else the defaults.
    """
    from sessa_jax.train.config import ConfigError, build

    if raw.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{where}: model_type={raw.get('model_type')!r}, expected "
                          f"{MODEL_TYPE!r} (a sessa_jax Hugging Face export)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    ours = (raw.get("sessa_jax") or {}).get("model") or {}
    model = {k: v for k, v in ours.items() if k in fields}
    for k, theirs in _ARCH.items():
        if theirs in raw:
            model[k] = raw[theirs]
    if model.get("n_kv_heads") == model.get("n_heads") and not ours.get("n_kv_heads"):
        model["n_kv_heads"] = None
    hidden = int(raw.get("intermediate_size") or 0)

    def make(m):
        try:
            return build(ModelConfig, m, "model")
        except (ConfigError, TypeError) as e:
            raise ExportError(f"{where}: {e}") from None

    cfg = make(model)
    if cfg.mlp_hidden != hidden:  # no (or another) mlp_ratio: take it from intermediate_size
        cfg = make({**model, "mlp_ratio": hidden / cfg.d_model if hidden else 0.0})
    if cfg.mlp_hidden != hidden:
        raise ExportError(f"{where}: intermediate_size={hidden} is not a width sessa_jax builds "
                          f"(a multiple of 8 of mlp_ratio * hidden_size)")
    check_hf_family(cfg)
    if cfg.family == "mamba" and raw.get("time_step_rank") not in (None, cfg.block_config().rank):
        raise ExportError(f"{where}: time_step_rank={raw['time_step_rank']} but sessa_jax uses "
                          f"ceil(hidden_size / 16) = {cfg.block_config().rank}")
    return cfg


# -- writing ---------------------------------------------------------------------------------------


def _write_shards(tensors: Mapping[str, np.ndarray], out_dir: str, limit: int) -> list[str]:
    """Greedy split in table order (a tensor above the limit gets a shard of its own)."""
    from sessa_jax.export.core import plan_shards, remove_old_shards, save_safetensors

    out = out_path(out_dir)
    shards = plan_shards(tensors, limit)
    remove_old_shards(out)
    meta = {"format": "pt", "sessa_jax": HF_FORMAT}  # "pt": what transformers accepts
    n = len(shards)
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        fname = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_safetensors({k: tensors[k] for k in names}, out / fname, meta)
        files.append(fname)
        weight_map.update({k: fname for k in names})
    if n > 1:
        total = sum(a.nbytes for a in tensors.values())
        (out / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1,
            sort_keys=True), encoding="utf-8")
    return files


def _tokenizer_files(tokenizer_spec: Optional[str], out_dir: str) -> Optional[dict]:
    """Write the run's tokenizer (its ids, and the SentencePiece file) -> its id dict."""
    out = out_path(out_dir)
    for old in (TOKENIZER_NAME, "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json"):
        if (out / old).exists():
            (out / old).unlink()
    if tokenizer_spec is None:
        return None
    from sessa_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_spec)
    from sessa_jax.data.tokenizer import is_hf_spec

    kind = ("bytes" if tokenizer_spec == "bytes" else
            "huggingface" if is_hf_spec(tokenizer_spec) else "sentencepiece")
    info = {"type": kind,
            "vocab_size": int(tok.vocab_size), "pad_id": int(tok.pad_id),
            "bos_id": int(tok.bos_id), "eos_id": int(tok.eos_id)}
    if info["type"] == "bytes":
        from sessa_jax.export.hf_tokenizer import write_byte_tokenizer

        info["offset"] = int(tok.offset)
        info["layout"] = "0 <pad>, 1 <bos>, 2 <eos>, byte b -> b + 3"
        write_byte_tokenizer(out_dir)  # for AutoTokenizer.from_pretrained
    elif kind == "huggingface":  # AutoTokenizer reads tokenizer.json as it is
        from etils import epath

        (out / "tokenizer.json").write_bytes(epath.Path(tokenizer_spec).read_bytes())
        info["file"] = "tokenizer.json"
    else:
        from etils import epath

        (out / "tokenizer.model").write_bytes(epath.Path(tokenizer_spec).read_bytes())
        info["file"] = "tokenizer.model"
    (out / TOKENIZER_NAME).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def export_hf(params, cfg: ModelConfig, out_dir: str, *, dtype: str = "fp32",
              max_shard_size="2GB", tokenizer: Optional[str] = None,
              extra: Optional[dict] = None) -> dict:
    """Write ``params`` (pure dict of a DecoderLM(cfg)) as a Hugging Face directory.

    ``tokenizer``: the run's tokenizer spec ("bytes" or a SentencePiece path) or None.
    Returns a summary: files, total_bytes, n_tensors, n_params, dtype, out_dir.
    """
    import jax

    check_hf_family(cfg)
    if dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected bf16 or fp32")
    np_dtype = np.dtype(jax.numpy.dtype(_DTYPES[dtype]))
    limit = parse_size(max_shard_size)
    from sessa_jax.models.layout import unstack_layers

    flat = {k: np.asarray(jax.device_get(v))
            for k, v in flatten_params(unstack_layers(params)).items()}  # per-layer names
    entries = hf_entries(cfg)
    names = {e.jax for e in entries}
    if set(flat) != names:  # a model/config mismatch is a bug here, not a user error
        raise ExportError(f"parameters do not match the config: only in params "
                          f"{sorted(set(flat) - names)}, only in the table "
                          f"{sorted(names - set(flat))}")
    tensors = {}
    for name, a in rename(flat, entries, to_hf=True).items():
        tensors[name] = a.astype(np_dtype) if np.issubdtype(a.dtype, np.floating) else a
    out = out_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = _write_shards(tensors, out, limit)
    tok = _tokenizer_files(tokenizer, out)
    conf = hf_config(cfg, dtype=_DTYPES[dtype], tokenizer=tok, extra=extra)
    (out / CONFIG_NAME).write_text(json.dumps(conf, indent=1), encoding="utf-8")
    for fname in CODE_FILES:
        with open(os.path.join(HF_FILES_DIR, fname), "rb") as f:  # shipped with this package
            (out / fname).write_bytes(f.read())
    return {"files": files, "total_bytes": sum(a.nbytes for a in tensors.values()),
            "n_tensors": len(tensors), "n_params": int(sum(a.size for a in tensors.values())),
            "dtype": _DTYPES[dtype], "out_dir": out_dir}


def run_tokenizer(train_cfg) -> Optional[str]:
    """The tokenizer spec a run trained with (text task), else None."""
    data = train_cfg.data
    return data.text.tokenizer if data.task == "text" else None


def export_run_hf(run_dir: str, out_dir: str, *, step: Optional[int] = None,
                  dtype: str = "fp32", max_shard_size="2GB") -> dict:
    """Export checkpoint ``step`` (default: newest) of a training run for Hugging Face."""
    from sessa_jax.train.checkpoint import load_params_host

    if not out_path(run_dir).is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    if dtype not in _DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected bf16 or fp32")
    parse_size(max_shard_size)
    out_path(out_dir)
    params, cfg, s = load_params_host(run_dir, step)  # host memory only, never a device
    summary = export_hf(params, cfg.model, out_dir, dtype=dtype, max_shard_size=max_shard_size,
                        tokenizer=run_tokenizer(cfg),
                        extra={"step": int(s), "source_run": str(out_path(run_dir))})
    summary["step"] = int(s)
    return summary


# -- reading ---------------------------------------------------------------------------------------


def read_hf_config(path: str) -> tuple[ModelConfig, dict]:
    if not out_path(path).is_dir():
        raise ExportError(f"{path}: no such directory")
    cpath = out_path(path) / CONFIG_NAME
    if not cpath.is_file():
        raise ExportError(f"{path}: no {CONFIG_NAME} (is this a Hugging Face export?)")
    try:
        raw = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{cpath}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{cpath}: expected a JSON object")
    return model_config_from_hf(raw, cpath), raw


def _tensor_files(path: str) -> dict[str, str]:
    """{tensor name: file} from the index, or from the single file."""
    from safetensors import safe_open

    base = out_path(path)
    ipath = base / INDEX_NAME
    if ipath.is_file():
        try:
            wm = json.loads(ipath.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ExportError(f"{ipath}: not a readable index ({type(e).__name__}: {e})") from None
        gone = sorted({v for v in wm.values() if not (base / v).is_file()})
        if gone:
            raise ExportError(f"{path}: shard files listed in {INDEX_NAME} are missing: "
                              + ", ".join(gone))
        return dict(wm)
    single = base / SINGLE_NAME
    if not single.is_file():
        raise ExportError(f"{path}: neither {SINGLE_NAME} nor {INDEX_NAME} found")
    try:
        with local_copy(single) as local, safe_open(local, "numpy") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ExportError(f"{single}: unreadable safetensors file ({type(e).__name__}: {e})"
                          ) from None


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    files = _tensor_files(path)
    base = out_path(path)
    out = {}
    for fname in sorted(set(files.values())):
        try:
            with local_copy(base / fname) as local, safe_open(local, "numpy") as f:
                for k in f.keys():
                    if files.get(k) == fname:
                        out[k] = f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ExportError(f"{base / fname}: unreadable safetensors file "
                              f"({type(e).__name__}: {e})") from None
    missing = sorted(k for k in files if k not in out)
    if missing:
        raise ExportError(f"{path}: tensors listed in {INDEX_NAME} but absent from their "
                          "shard: " + ", ".join(missing))
    return out


def read_hf(path: str) -> tuple[ModelConfig, dict, dict]:
    """Read a Hugging Face directory of this architecture -> (ModelConfig, params, config.json).

    ``params`` is a pure nested dict shaped like ``nnx.to_pure_dict`` of a DecoderLM(cfg), in
    the config's param dtype. Missing, unexpected and mis-shaped tensors raise ExportError
    listing each one. A tied model may carry ``lm_head.weight`` (transformers writes it in
    some versions) if it equals the embedding.
    """
    import jax

    from sessa_jax.train.state import abstract_model

    from sessa_jax.models.layout import to_layout

    cfg, raw = read_hf_config(path)
    state = _read_tensors(path)
    _, abstract, _ = abstract_model(dataclasses.replace(cfg, scan_layers=False))  # per layer
    want = {k: (tuple(v.shape), v.dtype) for k, v in flatten_params(abstract).items()}
    entries = hf_entries(cfg)
    extra = ()
    if cfg.tie_embeddings and "lm_head.weight" in state and "model.embed_tokens.weight" in state:
        if np.array_equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            extra = ("lm_head.weight",)
    try:
        check_state({k: v.shape for k, v in state.items()}, entries,
                    {k: s for k, (s, _) in want.items()}, path, allowed_extra=extra)
    except NameMismatchError as e:
        raise ExportError(str(e)) from None
    bad = sorted(e.hf for e in entries if np.issubdtype(state[e.hf].dtype, np.floating)
                 and not np.isfinite(state[e.hf]).all())
    if bad:  # a diverged or damaged checkpoint would only make a run that cannot train
        raise ExportError(f"{path}: non-finite values (NaN/inf) in {len(bad)} tensor(s): "
                          + ", ".join(bad))
    flat = rename(state, entries, to_hf=False)
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    names = list(flatten_params(abstract))  # same order as the leaves
    params = jax.tree_util.tree_unflatten(
        treedef, [flat[k].astype(want[k][1]) for k in names])
    return cfg, to_layout(params, cfg.scan_layers), raw
