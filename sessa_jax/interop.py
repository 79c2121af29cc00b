"""Exchange Sessa layers, and whole Sessa stacks, with the author's PyTorch naming.

PyTorch names (state_dict) <-> this package's parameters. A PyTorch Linear stores ``weight`` as
(out, in); our kernels are (in, out), so weights are transposed on the way in and out.

    state = load_reference_state("layer.safetensors")      # no torch needed
    layer = layer_from_reference(state, SessaConfig(d_model=768, n_heads=12))
    state2 = layer_to_reference(layer)                       # same names, NumPy arrays

Whole models (family "sessa"): every layer under ``layers.{i}.`` + the layer names above, plus

    embedding.weight (V, D), norm.weight / norm.bias (D,), lm_head.weight (V, D) when untied,
    layers.{i}.mlp.{ln.weight, ln.bias, gate_proj.weight, up_proj.weight, down_proj.weight}
    when mlp_ratio > 0 (the reference layer has no MLP; these names are this package's)

    state = model_to_reference(model);  model = model_from_reference(state, ModelConfig(...))
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sessa_jax.models.config import SessaConfig
from sessa_jax.models.sessa import SessaLayer

# torch name -> (our attribute path, is a Linear weight that needs a transpose)
_LINEARS = ("W_in", "W_out", "mixer.q_proj", "mixer.k_proj", "mixer.v_proj", "mixer.proj_fb")


def _check_reference_layer(cfg: SessaConfig) -> None:
    if getattr(cfg, "feedback_qk_norm", False):
        raise ValueError("feedback_qk_norm=True: the author's layer has no q_b/k_b norms, so "
                         "this layer has no reference state_dict (turn it off to interoperate)")


def _name_table(cfg: SessaConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    _check_reference_layer(cfg)
    return layer_name_table(cfg.n_heads)


def layer_name_table(n_heads: int) -> dict[str, tuple[tuple[str, ...], bool]]:
    """The author's name of every parameter of one Sessa layer -> (our attribute path,
    whether it is a Linear weight stored transposed). ``out_proj`` only with n_heads > 1."""
    table = {
        "ln.weight": (("ln", "scale"), False),
        "ln.bias": (("ln", "bias"), False),
        "mixer.gamma_ctx.weight": (("mixer", "gamma_ctx", "kernel"), True),
        "mixer.gamma_bias": (("mixer", "gamma_bias"), False),
    }
    for lin in _LINEARS:
        path = tuple(lin.split("."))
        table[f"{lin}.weight"] = (path + ("kernel",), True)
        table[f"{lin}.bias"] = (path + ("bias",), False)
    if n_heads > 1:
        table["mixer.out_proj.weight"] = (("mixer", "out_proj", "kernel"), True)
    return table


def _get(module, path):
    obj = module
    for p in path:
        obj = getattr(obj, p)
    return obj


def layer_from_reference(state: Mapping[str, np.ndarray], config: SessaConfig) -> SessaLayer:
    """Build a :class:`SessaLayer` holding the author's PyTorch parameters.

    ``state`` maps PyTorch state_dict names to arrays. Missing, unexpected or wrongly shaped
    entries raise ``ValueError`` listing every one of them.
    """
    layer = SessaLayer(config, rngs=nnx.Rngs(0))
    table = _name_table(config)
    missing = sorted(set(table) - set(state))
    unexpected = sorted(set(state) - set(table))
    bad_shape = []
    for name, (path, transpose) in table.items():
        if name not in state:
            continue
        var = _get(layer, path)
        arr = np.asarray(state[name])
        want = var[...].shape
        got = arr.T.shape if transpose else arr.shape
        if got != want:
            shown = tuple(reversed(want)) if transpose else want
            bad_shape.append(f"{name}: expected shape {shown}, got {arr.shape}")
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected))
        if bad_shape:
            parts.append("wrong shape: " + "; ".join(bad_shape))
        raise ValueError("reference state does not match SessaConfig " + repr(config) + "\n  "
                         + "\n  ".join(parts))
    for name, (path, transpose) in table.items():
        var = _get(layer, path)
        arr = np.asarray(state[name])
        var[...] = jnp.asarray(arr.T if transpose else arr, dtype=var[...].dtype)
    return layer


def layer_to_reference(layer: SessaLayer) -> dict[str, np.ndarray]:
    """The layer's parameters under the author's PyTorch names, as NumPy arrays."""
    out = {}
    for name, (path, transpose) in _name_table(layer.cfg).items():
        arr = np.asarray(jax.device_get(_get(layer, path)[...]))
        out[name] = np.ascontiguousarray(arr.T) if transpose else arr
    return out


def _model_entries(cfg):
    from sessa_jax.export.hf_names import Entry, mlp_entries, sessa_layer_entries

    if cfg.family != "sessa":
        raise ValueError(f"model family={cfg.family!r}: the author's naming covers Sessa stacks "
                         "only (use the Hugging Face export for other families)")
    _check_reference_layer(cfg)
    e = [Entry("embedding.weight", "embed.embedding", "copy")]
    for i in range(cfg.n_layers):
        e += sessa_layer_entries(cfg.n_heads, f"layers.{i}.", f"blocks.{i}.mixer.")
        if cfg.mlp_hidden:
            e += mlp_entries(f"layers.{i}.", f"blocks.{i}.")
    e += [Entry("norm.weight", "ln_f.scale", "copy"), Entry("norm.bias", "ln_f.bias", "copy")]
    if not cfg.tie_embeddings:
        e.append(Entry("lm_head.weight", "lm_head.kernel", "linear"))
    if cfg.num_classes:
        e += [Entry("cls_head.weight", "cls_head.kernel", "linear"),
              Entry("cls_head.bias", "cls_head.bias", "copy")]
    return e


def model_to_reference(model) -> dict[str, np.ndarray]:
    """A Sessa DecoderLM's parameters under the author's layer names (see the module doc)."""
    from sessa_jax.export.core import flatten_params
    from sessa_jax.export.hf_names import rename

    from sessa_jax.models.layout import unstack_layers

    params = unstack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # per-layer names
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_params(params).items()}
    return rename(flat, _model_entries(model.cfg), to_hf=True)


def model_from_reference(state: Mapping[str, np.ndarray], config):
    """Build a Sessa DecoderLM(config) holding ``state`` (names as :func:`model_to_reference`).

    Missing, unexpected or wrongly shaped entries raise ``ValueError`` listing every one.
    """
    from sessa_jax.export.core import flatten_params
    from sessa_jax.export.hf_names import check_state, rename
    from sessa_jax.models.lm import DecoderLM

    from sessa_jax.models.layout import stack_layers, unstack_layers

    entries = _model_entries(config)
    model = DecoderLM(config, rngs=nnx.Rngs(0))
    params = unstack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # per-layer names
    want = {k: tuple(v.shape) for k, v in flatten_params(params).items()}
    check_state({k: np.shape(v) for k, v in state.items()}, entries, want,
                f"reference state for {config!r}")
    flat = rename(state, entries, to_hf=False)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    new = [jnp.asarray(flat[k], dtype=leaf.dtype) for k, leaf in zip(want, leaves)]
    new = jax.tree_util.tree_unflatten(treedef, new)
    nnx.update(model, stack_layers(new) if config.scan_layers else new)
    return model


def load_reference_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch layer's state from ``.safetensors`` (no torch), ``.pt``/``.pth`` (torch,
    ``weights_only=True``) or ``.npz`` (keys as is, or under a ``param/`` prefix)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference state file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    if path.endswith((".pt", ".pth", ".bin")):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs torch; save it as .safetensors instead") from e
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.detach().cpu().numpy() for k, v in sd.items()}
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            keys = [k for k in z.files if k.startswith("param/")]
            if keys:
                return {k[len("param/"):]: z[k] for k in keys}
            return {k: z[k] for k in z.files}
    raise ValueError(f"{path}: expected a .safetensors, .pt/.pth or .npz file")
