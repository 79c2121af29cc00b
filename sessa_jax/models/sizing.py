"""Exact parameter counts for a :class:`ModelConfig`, and width matching across families.

:func:`param_count` is analytic (no model is built), and equals
``count_params(DecoderLM(cfg, ...))`` exactly; :func:`abstract_param_count` builds the model
under ``nnx.eval_shape`` (shapes only, no allocation) as an independent cross-check.

:func:`match_widths` picks, per family, the ``d_model`` (and head count) that brings a model of
a given depth within a tolerance (2% by default) of a target size, so that Sessa, Transformer
and Mamba baselines are compared at matched depth and parameter count. Head counts follow
:func:`default_head_dim`: head_dim 64 at large widths, smaller for tiny models.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional

from sessa_jax.models.config import (
    FAMILY_NAMES, AttentionConfig, Mamba2Config, MambaConfig, ModelConfig, SessaConfig,
)

FAMILIES = FAMILY_NAMES

# A family's own layout defaults where they differ from ModelConfig's shared defaults, used
# by match_widths when the caller does not fix the field: Mamba-2's state is N = 128 (the
# paper's), not Mamba-1's 16.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {"mamba2": {"d_state": 128}}

# ------------------------------------------------------------------------ exact counting


def _linear(d_in: int, d_out: int, bias: bool = True) -> int:
    return d_in * d_out + (d_out if bias else 0)


def _attention(c) -> int:
    """q/k/v projections (with bias) + out_proj (no bias; absent with one head)."""
    D, H, Hkv, d = c.d_model, c.n_heads, c.kv_heads, c.head_dim
    n = _linear(D, H * d) + 2 * _linear(D, Hkv * d)
    return n + (_linear(D, D, bias=False) if H > 1 else 0)


def mixer_params(cfg: ModelConfig) -> int:
    """Parameters of one mixer block (its pre-norm LayerNorm included), no MLP."""
    bc = cfg.block_config()
    D = cfg.d_model
    ln = 2 * D
    if isinstance(bc, SessaConfig):
        return (
            ln
            + _linear(D, 2 * D)  # W_in
            + _attention(bc)  # forward branch
            + _linear(D, 2 * D)  # proj_fb (q_b, k_b)
            + _linear(D, 1, bias=False)  # gamma_ctx
            + 1  # gamma_bias
            + _linear(D, D)  # W_out
            + (2 * D if bc.feedback_qk_norm else 0)  # RMSNorm scales on q_b, k_b
        )
    if isinstance(bc, AttentionConfig):
        return ln + _attention(bc)
    if isinstance(bc, Mamba2Config):
        E, F, H, K = bc.d_inner, bc.conv_dim, bc.n_heads, bc.d_conv
        return (
            ln
            + _linear(D, 2 * E, bias=False)  # in_proj: z, x
            + _linear(D, F - E + H, bias=False)  # bcdt_proj: B, C, dt
            + K * F + F  # depthwise conv kernel + bias on (x, B, C)
            + 3 * H  # dt_bias, A_log, D
            + E  # gated RMSNorm weight
            + _linear(E, D, bias=False)  # out_proj
        )
    assert isinstance(bc, MambaConfig)
    E, N, R, K = bc.d_inner, bc.d_state, bc.rank, bc.d_conv
    return (
        ln
        + _linear(D, 2 * E, bias=False)  # in_proj
        + K * E + E  # depthwise conv kernel + bias
        + _linear(E, R + 2 * N, bias=False)  # x_proj
        + _linear(R, E)  # dt_proj
        + E * N + E  # A_log, D
        + _linear(E, D, bias=False)  # out_proj
    )


def mlp_params(cfg: ModelConfig) -> int:
    """Parameters of one SwiGLU MLP block (LayerNorm + gate/up/down, no biases); 0 if none."""
    Hm = cfg.mlp_hidden
    return 2 * cfg.d_model + 3 * cfg.d_model * Hm if Hm else 0


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part: embed, mixers, mlps, ln_f, lm_head, cls_head, total."""
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.n_layers
    out = {
        "embed": V * D,
        "mixers": L * mixer_params(cfg),
        "mlps": L * mlp_params(cfg),
        "ln_f": 2 * D,
        "lm_head": 0 if cfg.tie_embeddings else _linear(D, V, bias=False),
        "cls_head": _linear(D, cfg.num_classes) if cfg.num_classes else 0,
    }
    out["total"] = sum(out.values())
    return out


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of ``DecoderLM(cfg)``, computed from the config alone."""
    return param_breakdown(cfg)["total"]


def abstract_param_count(cfg: ModelConfig) -> int:
    """Parameter count of ``DecoderLM(cfg)`` built under ``nnx.eval_shape`` (no allocation)."""
    import jax
    from flax import nnx

    from sessa_jax.models.lm import DecoderLM

    model = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0)))
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ------------------------------------------------------------------------ width matching


def default_head_dim(d_model: int) -> int:
    """Head dim used when n_heads is not fixed: 64 at large widths, smaller for tiny models."""
    if d_model >= 512:
        return 64
    if d_model >= 128:
        return 32
    return 16


@dataclasses.dataclass(frozen=True)
class Match:
    """One family's matched config: ``rel_err`` = params / target - 1; ``notes`` say what,
    beyond d_model (and the head count that follows it), had to change to hit the tolerance."""

    family: str
    config: ModelConfig
    params: int
    rel_err: float
    notes: tuple[str, ...] = ()


def _fixed_for(family: str, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve per-family values: a field given as {family: value} applies to that family only."""
    out = {}
    for k, v in fixed.items():
        if isinstance(v, Mapping):
            if family in v:
                out[k] = v[family]
        else:
            out[k] = v
    return out


def _try(family, n_layers, kw) -> Optional[ModelConfig]:
    try:
        return ModelConfig(family=family, n_layers=n_layers, **kw)
    except ValueError:
        return None


def _relaxed_heads(D: int, tier: int) -> list[int]:
    """Head counts for width D whose head_dim only stays near default_head_dim(D).

    tier 1: head_dim a multiple of 8 (what fused attention kernels want) within 25% of the
    default; tier 2: any even head_dim within a factor 2. Closest to the default first.
    """
    hd = default_head_dim(D)
    lo, hi, step = (0.75 * hd, 1.25 * hd, 8) if tier == 1 else (hd / 2, 2 * hd, 2)
    dims = [d for d in range(step, int(hi) + 1, step) if d >= lo and D % d == 0]
    return [D // d for d in sorted(dims, key=lambda d: abs(d - hd))]


def _attention_candidates(family, n_layers, kw, d_max, tier: int = 0):
    """Configs with d_model a multiple of 2 * n_heads (an even head dim, as RoPE needs).

    tier 0: n_heads fixed by the caller, or head_dim = default_head_dim(d_model) exactly;
    tiers 1, 2: see :func:`_relaxed_heads`.
    """
    H_fixed = kw.get("n_heads")
    Hkv = kw.get("n_kv_heads")
    for D in range(8, d_max + 1, 2):
        if H_fixed is not None:
            heads = [H_fixed] if D % (2 * H_fixed) == 0 else []
        elif tier == 0:
            hd = default_head_dim(D)
            heads = [D // hd] if D % hd == 0 else []
        else:
            heads = _relaxed_heads(D, tier)
        for H in heads:  # the first usable head count (closest head_dim to the default)
            if Hkv is not None and H % Hkv:
                continue
            cfg = _try(family, n_layers, {**kw, "d_model": D, "n_heads": H})
            if cfg is not None:
                yield cfg
                break


def _mamba_candidates(family, n_layers, kw, d_max):
    for D in range(8, d_max + 1, 8):
        cfg = _try(family, n_layers, {**kw, "d_model": D})
        if cfg is not None:
            yield cfg


def _best(cands: Iterable[ModelConfig], target: float):
    best = None
    for cfg in cands:
        err = param_count(cfg) / target - 1.0
        if best is None or abs(err) < abs(best[1]):
            best = (cfg, err)
    return best


def _tune_mlp(cands: Iterable[ModelConfig], target: float, *, grow: bool = False, n: int = 4):
    """Around the ``n`` widths closest to the target, try MLP hidden widths (multiples of 8:
    ``ModelConfig.mlp_hidden`` rounds up to 8) and return the best (config, rel_err).

    The stored mlp_ratio is rounded to 4 decimals and kept only if it reproduces the width.
    """
    near = sorted(cands, key=lambda c: abs(param_count(c) / target - 1))[:n]
    out = []
    for c in near:
        base = c.mlp_hidden or c.d_model
        lo, hi = (8, 2 * base) if grow else (max(8, base // 2) // 8 * 8, 2 * base)
        for h in range(lo, hi + 8, 8):
            cc = dataclasses.replace(c, mlp_ratio=round(h / c.d_model, 4))
            if cc.mlp_hidden == h:
                out.append(cc)
    return _best(out, target)


def _d_max(family, n_layers, kw, target) -> int:
    """An upper bound on d_model: params grow with d_model, so stop once 4x the target
    (counted with one head, which has fewer parameters than any multi-head layout)."""
    kw = {k: v for k, v in kw.items() if k not in ("n_heads", "n_kv_heads")}
    D = 64
    while D < 1 << 16:
        cfg = _try(family, n_layers, {**kw, "d_model": D, "n_heads": 1})
        if cfg is not None and param_count(cfg) > 4 * target:
            return D
        D *= 2
    return D


def _match_one(
    family: str, target: float, n_layers: int, kw: dict, tol: float, pinned: tuple[str, ...]
) -> Match:
    d_max = _d_max(family, n_layers, kw, target)
    attn = family in ("sessa", "transformer")
    notes: list[str] = []

    def strict():
        if attn:
            return _attention_candidates(family, n_layers, kw, d_max)
        return _mamba_candidates(family, n_layers, kw, d_max)

    best = _best(strict(), target)
    if best is None:
        raise ValueError(f"{family}: no valid config with fields {kw}")
    if abs(best[1]) <= tol:
        return Match(family, best[0], param_count(best[0]), best[1])

    # 1. A family with an MLP: keep its strict width grid, tune the MLP hidden width
    #    (a multiple of 8, so fine-grained) around the best few widths.
    if kw.get("mlp_ratio", 0):
        tuned = _tune_mlp(strict(), target)
        if tuned is not None and abs(tuned[1]) < abs(best[1]):
            best = tuned
            notes.append(
                f"mlp_ratio {kw['mlp_ratio']:.4g} -> {best[0].mlp_ratio:.4g} "
                f"(mlp hidden {best[0].mlp_hidden}) to reach the target"
            )
            if abs(best[1]) <= tol:
                return Match(family, best[0], param_count(best[0]), best[1], tuple(notes))

    # 2. Attention families: let head_dim drift from its default, first to other multiples of
    #    8, then to any even value within 2x (d_model stays a multiple of 2 * n_heads).
    if attn and "n_heads" not in kw:
        for tier in (1, 2):
            relaxed = _best(_attention_candidates(family, n_layers, kw, d_max, tier), target)
            if relaxed is not None and abs(relaxed[1]) < abs(best[1]):
                best = relaxed
                c = best[0]
                notes = [
                    f"head_dim {c.d_model // c.n_heads}"
                    f" (d_model {c.d_model} / {c.n_heads} heads) instead of "
                    f"{default_head_dim(c.d_model)} to reach the target"
                ]
                if abs(best[1]) <= tol:
                    return Match(family, c, param_count(c), best[1], tuple(notes))

    # 3. Mamba: its width grid is multiples of 8; try other expand factors, then d_state.
    if family == "mamba":
        base_expand = kw.get("expand", 2)
        base_state = kw.get("d_state", 16)
        for field, values in (("expand", (1, 2, 3, 4)), ("d_state", range(4, 65, 4))):
            if field in pinned:
                continue
            alt = _best(
                (c for v in values
                 for c in _mamba_candidates(family, n_layers, {**kw, field: v}, d_max)),
                target,
            )
            if alt is not None and abs(alt[1]) < abs(best[1]):
                best = alt
                c = best[0]
                notes = [
                    f"expand {base_expand} -> {c.expand}, d_state {base_state} -> {c.d_state} "
                    "to reach the target"
                ]
                if abs(best[1]) <= tol:
                    break

    # 3b. Mamba-2: its width grid is coarser (expand * d_model a multiple of the head dim);
    #     the smallest change of d_state (multiples of 16, nearest first) that reaches the
    #     tolerance, else the closest any d_state gets.
    if family == "mamba2" and "d_state" not in pinned:
        base_state = kw["d_state"]
        for n in sorted(range(16, 257, 16), key=lambda n: (abs(n - base_state), n)):
            alt = _best(_mamba_candidates(family, n_layers, {**kw, "d_state": n}, d_max), target)
            if alt is not None and abs(alt[1]) < abs(best[1]):
                best = alt
                notes = [f"d_state {base_state} -> {n} to reach the target"]
                if abs(best[1]) <= tol:
                    break

    # 4. Last resort, a family without an MLP (tiny models, where one step of d_model is
    #    several percent): add a small MLP below the closest smaller strict width.
    if abs(best[1]) > tol and "mlp_ratio" not in pinned:
        below = [c for c in strict() if param_count(c) < target]
        tuned = _tune_mlp(below, target, grow=True)
        if tuned is not None and abs(tuned[1]) < abs(best[1]):
            best = tuned
            c = best[0]
            notes = [f"added an MLP (mlp_ratio {c.mlp_ratio:.4g}, hidden {c.mlp_hidden}) "
                     "to reach the target"]

    cfg, err = best
    if abs(err) > tol:
        notes.append(f"could not reach {tol:.0%} of the target (closest: {err:+.2%})")
    return Match(family, cfg, param_count(cfg), err, tuple(notes))


def match_widths(
    target_params: float,
    n_layers: int,
    families: Iterable[str] = FAMILIES,
    *,
    tol: float = 0.02,
    **fixed,
) -> dict[str, Match]:
    """Pick d_model per family so that each model of depth ``n_layers`` is within ``tol`` of
    ``target_params``.

    Args:
      target_params: the target parameter count (e.g. 125e6).
      n_layers: depth, the same for every family.
      families: which families to match.
      tol: relative tolerance, 0.02 = 2%.
      **fixed: other ModelConfig fields (vocab_size, mlp_ratio, tie_embeddings, n_heads, ...).
        A value given as a mapping ``{family: value}`` applies to those families only, e.g.
        ``mlp_ratio={"transformer": 8/3}``.

    Width rules: attention families (sessa, transformer) use d_model a multiple of
    2 * n_heads, with n_heads = d_model / default_head_dim(d_model) unless n_heads is fixed;
    mamba uses d_model a multiple of 8, mamba2 too with expand * d_model a multiple of
    ssd_head_dim (its d_state defaults to 128, FAMILY_DEFAULTS). When d_model alone cannot reach the tolerance, in
    order: a family with an MLP tunes its mlp_ratio; an attention family lets head_dim drift
    from its default; mamba and mamba2 try other expand, then d_state values (unless given); last, a
    family whose mlp_ratio was not given gets a small MLP. Every such change is listed in
    ``Match.notes``; a family that still misses has a note saying so.

    Returns {family: Match}.
    """
    out = {}
    for fam in families:
        if fam not in FAMILIES:
            raise ValueError(f"family={fam!r}: expected one of {', '.join(FAMILIES)}")
        given = _fixed_for(fam, fixed)
        kw = {**FAMILY_DEFAULTS.get(fam, {}), **given}
        for bad in ("family", "n_layers", "d_model"):
            if bad in given:
                raise ValueError(f"match_widths sets {bad} itself; do not pass it")
        # Given by the caller: expand/d_state are never changed, and an MLP is never added
        # to a family whose mlp_ratio was given (a given mlp_ratio > 0 may still be tuned).
        pinned = tuple(k for k in ("expand", "d_state", "mlp_ratio") if k in given)
        out[fam] = _match_one(fam, float(target_params), n_layers, kw, tol, pinned)
    return out


# ------------------------------------------------------------------------ YAML files

# Fields always written to a model YAML; others only when they differ from the default.
_YAML_ALWAYS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                "mlp_ratio", "tie_embeddings")


def config_fields(cfg: ModelConfig) -> dict[str, Any]:
    """A ModelConfig as a flat {field: value} mapping for a YAML file: the main fields, plus
    any other field that differs from its default. n_heads/n_kv_heads are left out for mamba
    and mamba2 (unused), n_kv_heads when it is None."""
    default = ModelConfig()
    out = {}
    for f in dataclasses.fields(ModelConfig):
        v = getattr(cfg, f.name)
        if f.name in _YAML_ALWAYS or v != getattr(default, f.name):
            out[f.name] = v
    if cfg.family in ("mamba", "mamba2"):
        out.pop("n_heads", None)
        out.pop("n_kv_heads", None)
    if out.get("n_kv_heads", 0) is None:
        del out["n_kv_heads"]
    return out


def config_to_yaml(cfg: ModelConfig, comments: Iterable[str] = ()) -> str:
    """YAML text (flat ``field: value``) for ``cfg``, preceded by ``# comment`` lines."""
    import yaml

    head = "".join(f"# {c}\n" for c in comments)
    return head + yaml.safe_dump(config_fields(cfg), sort_keys=False)


def load_model_config(path: str) -> ModelConfig:
    """Read a flat ``field: value`` YAML file into a ModelConfig (unknown fields: ValueError)."""
    import yaml

    with open(path) as f:
        d = yaml.safe_load(f) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of ModelConfig fields")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{path}: unknown ModelConfig field(s): {', '.join(unknown)}")
    return ModelConfig(**d)
