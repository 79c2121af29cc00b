"""Parameter names and layouts of the Hugging Face / PyTorch export, both ways.

One table per ModelConfig pairs every tensor of the PyTorch model (``modeling_sessa.py``,
shipped in ``hf_files/``) with the JAX parameter it holds, and how the layout changes:

    kind "copy"    same array (LayerNorm scale -> ``weight``, biases, A_log, D, gamma_bias)
    kind "linear"  JAX kernel (in, out) -> PyTorch Linear weight (out, in): a transpose
    kind "conv"    JAX depthwise conv kernel (K, E) -> PyTorch Conv1d weight (E, 1, K)

Names (``i`` = layer index; the Sessa layer's own names are the author's, from
:mod:`sessa_jax.interop`):

    model.embed_tokens.weight                    (V, D)      embed.embedding
    model.layers.i.ln.weight / .bias             (D,)        blocks.i.mixer.ln.{scale,bias}
      sessa:       model.layers.i.W_in.*, .W_out.*, .mixer.{q,k,v,out,}_proj.*, .mixer.proj_fb.*,
                   .mixer.gamma_ctx.weight (1, D), .mixer.gamma_bias ()
      transformer: model.layers.i.self_attn.{q,k,v}_proj.{weight,bias}, .self_attn.out_proj.weight
      mamba:       model.layers.i.mixer.{in_proj,x_proj,dt_proj,out_proj}.weight,
                   .mixer.dt_proj.bias, .mixer.conv1d.{weight (E,1,K), bias}, .mixer.A_log, .mixer.D
    model.layers.i.mlp.ln.*, .mlp.{gate,up,down}_proj.weight          (when mlp_ratio > 0)
    model.norm.weight / .bias                    (D,)        ln_f.{scale,bias}
    lm_head.weight                               (V, D)      lm_head.kernel (untied heads only)
    cls_head.weight / .bias                      (C, D)      cls_head.* (num_classes > 0)

NumPy only: no torch needed.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from sessa_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: its PyTorch name, its JAX flat name (dot-joined NNX path) and layout kind."""

    hf: str
    jax: str
    kind: str  # "copy" | "linear" | "conv"


class NameMismatchError(ValueError):
    """A state does not match the names/shapes a ModelConfig needs; the message lists all."""


def _lin(hf: str, jax: str, bias: bool = True) -> list[Entry]:
    out = [Entry(f"{hf}.weight", f"{jax}.kernel", "linear")]
    if bias:
        out.append(Entry(f"{hf}.bias", f"{jax}.bias", "copy"))
    return out


def _norm(hf: str, jax: str) -> list[Entry]:
    return [Entry(f"{hf}.weight", f"{jax}.scale", "copy"), Entry(f"{hf}.bias", f"{jax}.bias", "copy")]


def sessa_layer_entries(n_heads: int, hf_prefix: str, jax_prefix: str) -> list[Entry]:
    """One Sessa layer under the author's names (``ln``, ``W_in``, ``mixer.q_proj`` ...), from
    the single-layer table of :mod:`sessa_jax.interop`."""
    from sessa_jax.interop import layer_name_table

    return [Entry(hf_prefix + name, jax_prefix + ".".join(path), "linear" if t else "copy")
            for name, (path, t) in layer_name_table(n_heads).items()]


def _attention_entries(n_heads: int, p: str, j: str) -> list[Entry]:
    e = _norm(f"{p}ln", f"{j}ln")
    for name in ("q_proj", "k_proj", "v_proj"):
        e += _lin(f"{p}self_attn.{name}", f"{j}attn.{name}")
    if n_heads > 1:
        e += _lin(f"{p}self_attn.out_proj", f"{j}attn.out_proj", bias=False)
    return e


def _mamba_entries(p: str, j: str) -> list[Entry]:
    e = _norm(f"{p}ln", f"{j}norm")
    for name in ("in_proj", "x_proj", "out_proj"):
        e += _lin(f"{p}mixer.{name}", f"{j}{name}", bias=False)
    e += _lin(f"{p}mixer.dt_proj", f"{j}dt_proj")
    e += [Entry(f"{p}mixer.conv1d.weight", f"{j}conv_kernel", "conv"),
          Entry(f"{p}mixer.conv1d.bias", f"{j}conv_bias", "copy"),
          Entry(f"{p}mixer.A_log", f"{j}A_log", "copy"),
          Entry(f"{p}mixer.D", f"{j}D", "copy")]
    return e


def mlp_entries(p: str, j: str) -> list[Entry]:
    e = _norm(f"{p}mlp.ln", f"{j}mlp.ln")
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        e += _lin(f"{p}mlp.{theirs}", f"{j}mlp.{ours}", bias=False)
    return e


def hf_entries(cfg: ModelConfig) -> list[Entry]:
    """Every tensor of the exported model, in a fixed order (layer by layer)."""
    e = [Entry("model.embed_tokens.weight", "embed.embedding", "copy")]
    for i in range(cfg.n_layers):
        p, j = f"model.layers.{i}.", f"blocks.{i}.mixer."
        if cfg.family == "sessa":
            e += sessa_layer_entries(cfg.n_heads, p, j)
        elif cfg.family == "transformer":
            e += _attention_entries(cfg.n_heads, p, j)
        elif cfg.family == "mamba":
            e += _mamba_entries(p, j)
        else:
            raise ValueError(f"model.family={cfg.family!r}: no Hugging Face names for it")
        if cfg.mlp_hidden:
            e += mlp_entries(p, f"blocks.{i}.")
    e += _norm("model.norm", "ln_f")
    if not cfg.tie_embeddings:
        e.append(Entry("lm_head.weight", "lm_head.kernel", "linear"))
    if cfg.num_classes:
        e += _lin("cls_head", "cls_head")
    return e


# -- layout conversion -----------------------------------------------------------------------------


def to_torch_layout(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":  # (K, E) -> (E, 1, K)
        return np.ascontiguousarray(a.T[:, None, :])
    return np.array(a, order="C")  # (ascontiguousarray would make a 0-d array 1-d)


def from_torch_layout(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":  # (E, 1, K) -> (K, E)
        return np.ascontiguousarray(a[:, 0, :].T)
    return np.array(a, order="C")


def torch_shape(shape: tuple, kind: str) -> tuple:
    if kind == "linear":
        return tuple(reversed(shape))
    if kind == "conv":
        return (shape[1], 1, shape[0])
    return tuple(shape)


def rename(flat: Mapping[str, np.ndarray], entries: list[Entry], *, to_hf: bool) -> dict:
    """Apply ``entries`` to a flat state (JAX names -> HF names when ``to_hf``, else back).

    No shape checks here: see :func:`check_state` for the reverse direction.
    """
    out = {}
    for e in entries:
        if to_hf:
            out[e.hf] = to_torch_layout(np.asarray(flat[e.jax]), e.kind)
        else:
            out[e.jax] = from_torch_layout(np.asarray(flat[e.hf]), e.kind)
    return out


def check_state(shapes: Mapping[str, tuple], entries: list[Entry], want: Mapping[str, tuple],
                what: str, allowed_extra: tuple = ()) -> None:
    """Raise NameMismatchError listing every missing, unexpected and mis-shaped tensor.

    ``shapes``: PyTorch-side name -> shape found; ``want``: JAX name -> shape needed.
    """
    names = {e.hf for e in entries}
    missing = [e.hf for e in entries if e.hf not in shapes]
    unexpected = sorted(k for k in shapes if k not in names and k not in allowed_extra)
    bad = []
    for e in entries:
        if e.hf in shapes:
            need = torch_shape(tuple(want[e.jax]), e.kind)
            if tuple(shapes[e.hf]) != need:
                bad.append(f"{e.hf}: expected {need}, got {tuple(shapes[e.hf])}")
    if missing or unexpected or bad:
        from sessa_jax.export.core import mismatch_listing

        raise NameMismatchError(f"{what}: tensors do not match the model config\n  "
                                + mismatch_listing(missing, unexpected, bad))
