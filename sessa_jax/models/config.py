"""Typed configuration for every model in the package.

One frozen dataclass per layer kind, plus :class:`ModelConfig` for a whole decoder LM.
Each validates itself in ``__post_init__`` and raises ``ValueError`` naming the field, so a bad
YAML value fails at load time with a readable message instead of deep inside a trace.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import jax.numpy as jnp

from sessa_jax.ops.attention import ATTENTION_IMPLS, AttentionImpl, check_attention_impl

FeedbackImpl = Literal["dense", "chunked", "pallas"]
Family = Literal["sessa", "transformer", "mamba", "mamba2"]
FAMILY_NAMES = ("sessa", "transformer", "mamba", "mamba2")
Remat = Literal["none", "full", "dots", "save_feedback"]
_REMATS = ("none", "full", "dots", "save_feedback")
LayerRemat = Literal["none", "staged"]
_LAYER_REMATS = ("none", "staged")

_DTYPES = ("float32", "bfloat16", "float16", "float64")


def to_dtype(name: str):
    """Config dtype string -> jnp dtype."""
    return jnp.dtype(name)


def _check_dtype(field: str, value: str) -> None:
    if value not in _DTYPES:
        raise ValueError(f"{field}={value!r}: expected one of {', '.join(_DTYPES)}")


def _check_positive(field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{field}={value!r}: expected a positive integer")


def _check_attention(impl: str, head_dim: int, dtype: str) -> None:
    if dtype in _DTYPES:  # a bad dtype gets its own message from _check_dtype
        check_attention_impl(impl, head_dim=head_dim, dtype=to_dtype(dtype))
    elif impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")


def _check_heads(prefix: str, d_model: int, n_heads: int, n_kv_heads: Optional[int], rope: bool):
    _check_positive(f"{prefix}d_model", d_model)
    _check_positive(f"{prefix}n_heads", n_heads)
    if d_model % n_heads:
        raise ValueError(
            f"{prefix}d_model={d_model} is not divisible by {prefix}n_heads={n_heads}"
        )
    if n_kv_heads is not None:
        _check_positive(f"{prefix}n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(
                f"{prefix}n_heads={n_heads} is not divisible by {prefix}n_kv_heads={n_kv_heads}"
            )
    if rope and (d_model // n_heads) % 2:
        raise ValueError(
            f"{prefix}use_rope=True needs an even head dim, got d_model/n_heads = "
            f"{d_model}/{n_heads} = {d_model // n_heads}"
        )


@dataclasses.dataclass(frozen=True)
class SessaConfig:
    """One Sessa layer (pre-norm residual block around the Sessa mixer), per SESSA_SPEC.md."""

    d_model: int
    n_heads: int
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no GQA)
    use_rope: bool = True
    rope_base: float = 10000.0
    gamma_max: float = 0.999
    gamma_bias_init: float = 1.0  # the gain's bias starts here (reference: 1.0, tanh(1) = 0.76)
    ln_eps: float = 1e-5
    feedback_impl: FeedbackImpl = "chunked"
    chunk_size: int = 512  # rows per block of the chunked feedback solve (H100: 512 beat 256)
    attention_impl: AttentionImpl = "auto"  # the forward branch's backend (ops/attention.py)
    # chunked solve: scans the sweep is split into (causal skipping, (1 + 1/n)/2 of the
    # rectangle) and how each diagonal block is inverted ("solve", "doubling", "blocked")
    feedback_segments: int = 8
    feedback_inverse: Literal["solve", "doubling", "blocked"] = "blocked"
    # sweeps of at most this many chunks are unrolled, one chunk a step (0: never)
    feedback_unroll: int = 8
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Opt-in stabiliser (issue 18): RMSNorm (learned scale, no bias) on q_b and k_b, so the
    # feedback scores q_b.k_b/sqrt(D) stay bounded. Off: the reference layer, parameters and all.
    feedback_qk_norm: bool = False
    # "staged": the layer's backward pass runs in stages that each recompute their own inputs
    # from the layer input (LayerNorm, projections, GELU, gamma, the forward attention
    # branch), so only the solve's residuals (s, ctx, lse; block inverses recomputed) and
    # the layer input live across stages: about half the peak memory of a trained layer, for
    # one more attention forward and a few projections. Same outputs and gradients.
    layer_remat: LayerRemat = "none"

    def __post_init__(self):
        _check_heads("", self.d_model, self.n_heads, self.n_kv_heads, self.use_rope)
        if self.layer_remat not in _LAYER_REMATS:
            raise ValueError(f"layer_remat={self.layer_remat!r}: expected one of "
                             f"{', '.join(_LAYER_REMATS)}")
        _check_attention(self.attention_impl, self.d_model // self.n_heads, self.dtype)
        if not isinstance(self.feedback_qk_norm, bool):
            raise ValueError(
                f"feedback_qk_norm={self.feedback_qk_norm!r}: expected true or false")
        if not (isinstance(self.gamma_max, (int, float)) and 0.0 < self.gamma_max < 1.0):
            raise ValueError(f"gamma_max={self.gamma_max!r}: expected a number in (0, 1)")
        if not (isinstance(self.gamma_bias_init, (int, float))
                and not isinstance(self.gamma_bias_init, bool)
                and math.isfinite(self.gamma_bias_init)):
            raise ValueError(f"gamma_bias_init={self.gamma_bias_init!r}: expected a finite number")
        if self.feedback_impl not in ("dense", "chunked", "pallas"):
            raise ValueError(
                f"feedback_impl={self.feedback_impl!r}: expected 'dense', 'chunked' or 'pallas'"
            )
        _check_positive("chunk_size", self.chunk_size)
        _check_positive("feedback_segments", self.feedback_segments)
        if not isinstance(self.feedback_unroll, int) or self.feedback_unroll < 0:
            raise ValueError(
                f"feedback_unroll={self.feedback_unroll!r}: expected an integer >= 0 (0 = never)"
            )
        if self.feedback_inverse not in ("solve", "doubling", "blocked"):
            raise ValueError(
                f"feedback_inverse={self.feedback_inverse!r}: expected solve, doubling or blocked"
            )
        if not self.ln_eps > 0:
            raise ValueError(f"ln_eps={self.ln_eps!r}: expected a positive number")
        _check_dtype("dtype", self.dtype)
        _check_dtype("param_dtype", self.param_dtype)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def attention(self) -> "AttentionConfig":
        """The forward branch's attention settings."""
        return AttentionConfig(
            d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
            use_rope=self.use_rope, rope_base=self.rope_base, ln_eps=self.ln_eps,
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        )


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One pre-norm causal self-attention block (the Transformer baseline's mixer)."""

    d_model: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    use_rope: bool = True
    rope_base: float = 10000.0
    ln_eps: float = 1e-5
    attention_impl: AttentionImpl = "auto"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        _check_heads("", self.d_model, self.n_heads, self.n_kv_heads, self.use_rope)
        _check_attention(self.attention_impl, self.d_model // self.n_heads, self.dtype)
        _check_dtype("dtype", self.dtype)
        _check_dtype("param_dtype", self.param_dtype)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """One pre-norm Mamba-style selective SSM block (Gu & Dao 2023, 'Mamba-1' layout)."""

    d_model: int
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: Optional[int] = None  # None: ceil(d_model / 16)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    ln_eps: float = 1e-5
    scan_impl: Literal["associative", "chunked", "sequential"] = "chunked"
    # H100, B=64 T=1024 E=1008 fwd+bwd (BENCHMARKS.md): chunk 16 52.8 ms, 256 69.2 ms, and 64
    # 261 ms (XLA handles that size badly: 5x slower and a 57 s compile), so not 64.
    chunk_size: int = 16
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for f in ("d_model", "d_state", "expand", "d_conv", "chunk_size"):
            _check_positive(f, getattr(self, f))
        if self.dt_rank is not None:
            _check_positive("dt_rank", self.dt_rank)
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"dt_min={self.dt_min!r}, dt_max={self.dt_max!r}: expected 0 < dt_min <= dt_max"
            )
        if self.scan_impl not in ("associative", "chunked", "sequential"):
            raise ValueError(
                f"scan_impl={self.scan_impl!r}: expected 'associative', 'chunked' or 'sequential'"
            )
        _check_dtype("dtype", self.dtype)
        _check_dtype("param_dtype", self.param_dtype)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)


def _check_ssd_shape(d_model, d_state, expand, head_dim, ngroups, d_conv, chunk_size, impl,
                     names=None) -> None:
    """The shape fields of a Mamba-2 block; ``names`` renames fields in the messages (the
    ModelConfig spells head_dim ``ssd_head_dim`` and so on)."""
    n = {f: f for f in ("d_model", "d_state", "expand", "head_dim", "ngroups", "d_conv",
                        "chunk_size", "scan_impl")}
    n.update(names or {})
    vals = dict(d_model=d_model, d_state=d_state, expand=expand, head_dim=head_dim,
                ngroups=ngroups, d_conv=d_conv, chunk_size=chunk_size)
    for f, v in vals.items():
        _check_positive(n[f], v)
    E = expand * d_model
    if E % head_dim:
        raise ValueError(
            f"{n['head_dim']}={head_dim} does not divide d_inner = {n['expand']} * "
            f"{n['d_model']} = {expand} * {d_model} = {E}"
        )
    if (E // head_dim) % ngroups:
        raise ValueError(
            f"{n['ngroups']}={ngroups} does not divide the {E // head_dim} heads "
            f"(d_inner {E} / {n['head_dim']} {head_dim})"
        )
    if impl not in ("chunked", "sequential"):
        raise ValueError(f"{n['scan_impl']}={impl!r}: expected 'chunked' or 'sequential'")


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """One pre-norm Mamba-2 block (Dao & Gu 2024): multi-head SSM with a scalar decay per head,
    computed in the chunked matmul ("SSD") form (sessa_jax/ops/ssd.py)."""

    d_model: int
    d_state: int = 128  # N (the Mamba-2 paper's default)
    expand: int = 2  # d_inner E = expand * d_model
    head_dim: int = 64  # P; n_heads H = E / P
    ngroups: int = 1  # G groups of heads sharing one B and C
    d_conv: int = 4  # taps of the causal depthwise conv on (x, B, C)
    chunk_size: int = 128  # Q of the chunked scan: Q x Q intra-chunk products, T/Q serial steps
    scan_impl: Literal["chunked", "sequential"] = "chunked"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    ln_eps: float = 1e-5  # the pre-norm LayerNorm and the gated RMSNorm
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        _check_ssd_shape(self.d_model, self.d_state, self.expand, self.head_dim, self.ngroups,
                         self.d_conv, self.chunk_size, self.scan_impl)
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"dt_min={self.dt_min!r}, dt_max={self.dt_max!r}: expected 0 < dt_min <= dt_max"
            )
        if not self.ln_eps > 0:
            raise ValueError(f"ln_eps={self.ln_eps!r}: expected a positive number")
        _check_dtype("dtype", self.dtype)
        _check_dtype("param_dtype", self.param_dtype)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: x (E) and B, C (G * N each)."""
        return self.d_inner + 2 * self.ngroups * self.d_state


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder LM: embedding -> n_layers blocks -> final LayerNorm -> LM head.

    ``family`` picks the block mixer; fields that a family does not use are ignored by it.
    """

    family: Family = "sessa"
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    mlp_ratio: float = 0.0  # SwiGLU hidden = mlp_ratio * d_model; 0 = no MLP sub-block
    tie_embeddings: bool = True
    num_classes: int = 0  # > 0 adds a classification head beside the LM head
    use_rope: bool = True
    rope_base: float = 10000.0
    ln_eps: float = 1e-5
    attention_impl: AttentionImpl = "auto"  # sessa/transformer attention backend
    # Sessa
    gamma_max: float = 0.999
    gamma_bias_init: float = 1.0  # SessaConfig.gamma_bias_init (an ablation knob)
    feedback_impl: FeedbackImpl = "chunked"
    chunk_size: int = 512
    feedback_qk_norm: bool = False  # RMSNorm on q_b/k_b (SessaConfig.feedback_qk_norm)
    feedback_segments: int = 8
    feedback_inverse: Literal["solve", "doubling", "blocked"] = "blocked"
    feedback_unroll: int = 8
    # Mamba-style
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    scan_impl: Literal["associative", "chunked", "sequential"] = "chunked"
    ssm_chunk_size: int = 16  # the Mamba block's scan chunk (chunk_size is Sessa's)
    # Mamba-2 (family "mamba2"; d_state, expand, d_conv above are shared with "mamba")
    ssd_head_dim: int = 64  # P: heads = expand * d_model / ssd_head_dim
    ssd_ngroups: int = 1  # groups of heads sharing B and C
    ssd_chunk_size: int = 128  # the SSD scan's chunk Q (ops/ssd.py)
    ssd_impl: Literal["chunked", "sequential"] = "chunked"
    # execution
    # "save_feedback": recompute each block in the backward pass except the feedback solve,
    # whose named residuals (s, ctx, lse, block inverses) are kept.
    remat: Remat = "none"
    # Build the blocks as one stack (parameters with a leading 'layers' axis) and run them with
    # nnx.scan: one block body in the HLO instead of n_layers copies (pod compiles). Same
    # numbers as unscanned; checkpoints convert between the layouts, exports are per layer.
    scan_layers: bool = False
    # Sessa only: "staged" runs each layer's backward in stages (SessaConfig.layer_remat);
    # composes with ``remat`` (which decides what is kept between layers).
    layer_remat: LayerRemat = "none"
    # Positions per chunk of the training cross-entropy (0: the whole sequence at once). With
    # a chunk, (B, T, V) float32 logits never exist: each chunk's are made, reduced and
    # recomputed in the backward pass (one extra LM-head product, B*T*V*4 bytes less).
    loss_chunk_size: int = 0
    # The embedding's backward (ops/embedding.py): "scatter" a float32 scatter-add, "onehot"
    # one-hot matmuls over token chunks (no atomics; the TPU-friendly form). Either way the
    # gradient is summed in the table's dtype, not in the compute dtype.
    embed_grad: Literal["scatter", "onehot"] = "scatter"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.family not in FAMILY_NAMES:
            raise ValueError(
                f"family={self.family!r}: expected one of {', '.join(FAMILY_NAMES)}"
            )
        for f in ("vocab_size", "d_model", "n_layers"):
            _check_positive(f, getattr(self, f))
        if not (isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio >= 0):
            raise ValueError(f"mlp_ratio={self.mlp_ratio!r}: expected a number >= 0")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes={self.num_classes!r}: expected an integer >= 0")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"scan_layers={self.scan_layers!r}: expected true or false")
        if self.remat not in _REMATS:
            raise ValueError(f"remat={self.remat!r}: expected one of {', '.join(_REMATS)}")
        if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
            raise ValueError(
                f"loss_chunk_size={self.loss_chunk_size!r}: expected an integer >= 0 (0 = off)"
            )
        if self.embed_grad not in ("scatter", "onehot"):
            raise ValueError(f"embed_grad={self.embed_grad!r}: expected 'scatter' or 'onehot'")
        if self.family == "mamba2":  # checked here first, so the messages name these fields
            _check_ssd_shape(self.d_model, self.d_state, self.expand, self.ssd_head_dim,
                             self.ssd_ngroups, self.d_conv, self.ssd_chunk_size, self.ssd_impl,
                             names=dict(head_dim="ssd_head_dim", ngroups="ssd_ngroups",
                                        chunk_size="ssd_chunk_size", scan_impl="ssd_impl"))
        self.block_config()  # validates the family's own fields, naming them

    def block_config(self):
        """The layer config of this model's mixer block."""
        if self.family == "sessa":
            return SessaConfig(
                d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                use_rope=self.use_rope, rope_base=self.rope_base, gamma_max=self.gamma_max,
                gamma_bias_init=self.gamma_bias_init,
                ln_eps=self.ln_eps, feedback_impl=self.feedback_impl,
                chunk_size=self.chunk_size, attention_impl=self.attention_impl,
                feedback_segments=self.feedback_segments, feedback_inverse=self.feedback_inverse,
                feedback_unroll=self.feedback_unroll, dtype=self.dtype,
                param_dtype=self.param_dtype,
                feedback_qk_norm=self.feedback_qk_norm, layer_remat=self.layer_remat,
            )
        if self.family == "transformer":
            return AttentionConfig(
                d_model=self.d_model, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                use_rope=self.use_rope, rope_base=self.rope_base, ln_eps=self.ln_eps,
                attention_impl=self.attention_impl, dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        if self.family == "mamba2":
            return Mamba2Config(
                d_model=self.d_model, d_state=self.d_state, expand=self.expand,
                head_dim=self.ssd_head_dim, ngroups=self.ssd_ngroups, d_conv=self.d_conv,
                chunk_size=self.ssd_chunk_size, scan_impl=self.ssd_impl,
                ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            )
        return MambaConfig(
            d_model=self.d_model, d_state=self.d_state, expand=self.expand, d_conv=self.d_conv,
            ln_eps=self.ln_eps, scan_impl=self.scan_impl, chunk_size=self.ssm_chunk_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    @property
    def mlp_hidden(self) -> int:
        # Rounded to a multiple of 8 so that tensor-parallel shards and tiles stay aligned.
        return int(8 * math.ceil(self.mlp_ratio * self.d_model / 8)) if self.mlp_ratio else 0
