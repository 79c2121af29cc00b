"""Exchange single Sessa layers with the author's PyTorch implementation.

PyTorch names (state_dict) <-> this package's parameters. A PyTorch Linear stores ``weight`` as
(out, in); our kernels are (in, out), so weights are transposed on the way in and out.

    state = load_reference_state("layer.safetensors")      # no torch needed
    layer = layer_from_reference(state, SessaConfig(d_model=768, n_heads=12))
    state2 = layer_to_reference(layer)                       # same names, NumPy arrays
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


def _name_table(cfg: SessaConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
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
    if cfg.n_heads > 1:
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
