"""PyTorch decoder LM for checkpoints exported by sessa_jax (``sessa-export --format hf``).

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    logits = model(input_ids).logits                      # (B, T, V)
    out = model.generate(input_ids, max_new_tokens=32, do_sample=False)

A model is: token embedding -> N blocks -> final LayerNorm -> LM head (tied to the embedding
or its own ``lm_head``). A block is the family's pre-norm residual mixer block, optionally
followed by a pre-norm residual SwiGLU MLP block (``intermediate_size > 0``):

* ``sessa``: u = LN(x); a, g = split(W_in u); a = GELU(a) (exact erf);
  s = SessaMixer(a); y = x + W_out(s * g). The mixer's forward branch f is causal multi-head
  attention (diagonal included, GQA, RoPE); its feedback branch solves the unit lower-triangular
  system (I - diag(gamma) alpha) s = f with alpha the strictly causal softmax of
  q_b . k_b / sqrt(D) (row 0 all zero), (q_b, k_b) = split(proj_fb a), and
  gamma = gamma_max * tanh(gamma_bias + gamma_ctx a). Solved densely here (O(T^2) memory).
* ``transformer``: y = x + Attention(LN(x)).
* ``mamba``: y = x + Mamba-1 mixer(LN(x)) (selective scan, run step by step here).
* MLP: y = x + down_proj(SiLU(gate_proj u) * up_proj u), u = LN(x).

RoPE: interleaved pairs (0,1), (2,3), ...; inv_freq[i] = theta^(-2i/d) formed in float32.

Generation recomputes the whole sequence at every step (no cache): simple and exact, O(T^2)
per token. Padded batches are not supported (every row must be real tokens).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_sessa import SessaConfig


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Softmax / solve precision: float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def apply_rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate x (B, T, H, d) by positions 0..T-1, interleaved pairs."""
    d, T = x.shape[-1], x.shape[1]
    acc = _acc_dtype(x)
    inv_freq = (base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)).to(acc)
    ang = torch.arange(T, dtype=acc, device=x.device)[:, None] * inv_freq  # (T, d/2)
    cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    xf = x.to(acc)
    xe, xo = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], dim=-1)
    return out.reshape(x.shape).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with GQA: (B, T, D) -> (B, T, D).

    Query head h reads key/value head h // (H / Hkv). No output projection with one head.
    """

    def __init__(self, config: SessaConfig):
        super().__init__()
        D, H, Hkv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.n_heads, self.n_kv, self.head_dim = H, Hkv, D // H
        self.use_rope, self.rope_theta = config.use_rope, config.rope_theta
        self.q_proj = nn.Linear(D, H * self.head_dim)
        self.k_proj = nn.Linear(D, Hkv * self.head_dim)
        self.v_proj = nn.Linear(D, Hkv * self.head_dim)
        self.out_proj = nn.Linear(D, D, bias=False) if H > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, d)
        k = self.k_proj(x).view(B, T, self.n_kv, d)
        v = self.v_proj(x).view(B, T, self.n_kv, d)
        if self.use_rope:
            q, k = apply_rope(q, self.rope_theta), apply_rope(k, self.rope_theta)
        rep = self.n_heads // self.n_kv
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        acc = _acc_dtype(x)
        scores = torch.einsum("bthd,bshd->bhts", q.to(acc), k.to(acc)) / math.sqrt(d)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        o = torch.einsum("bhts,bshd->bthd", p, v.to(acc)).to(x.dtype).reshape(B, T, D)
        return self.out_proj(o) if self.out_proj is not None else o


class SessaMixer(Attention):
    """Forward attention branch f, then the feedback solve s = (I - diag(gamma) alpha)^{-1} f."""

    def __init__(self, config: SessaConfig):
        super().__init__(config)
        D = config.hidden_size
        self.gamma_max = config.gamma_max
        self.proj_fb = nn.Linear(D, 2 * D)
        self.gamma_ctx = nn.Linear(D, 1, bias=False)
        self.gamma_bias = nn.Parameter(torch.tensor(1.0))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        B, T, D = a.shape
        f = super().forward(a)
        q_b, k_b = self.proj_fb(a).chunk(2, dim=-1)
        gamma = self.gamma_max * torch.tanh(self.gamma_bias + self.gamma_ctx(a)[..., 0])  # (B, T)
        acc = _acc_dtype(a)
        scores = torch.einsum("btd,bsd->bts", q_b.to(acc), k_b.to(acc)) / math.sqrt(D)
        strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
        alpha = torch.softmax(scores.masked_fill(~strict, float("-inf")), dim=-1)
        alpha = torch.nan_to_num(alpha, nan=0.0)  # row 0 reads nothing: all -inf -> 0
        m = torch.eye(T, dtype=acc, device=a.device) - gamma.to(acc)[..., None] * alpha
        s = torch.linalg.solve_triangular(m, f.to(acc), upper=False, unitriangular=True)
        return s.to(a.dtype)


class MLP(nn.Module):
    """Pre-norm residual SwiGLU block."""

    def __init__(self, config: SessaConfig):
        super().__init__()
        D, Hm = config.hidden_size, config.intermediate_size
        self.ln = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.gate_proj = nn.Linear(D, Hm, bias=False)
        self.up_proj = nn.Linear(D, Hm, bias=False)
        self.down_proj = nn.Linear(Hm, D, bias=False)

    def forward(self, x):
        u = self.ln(x)
        return x + self.down_proj(F.silu(self.gate_proj(u)) * self.up_proj(u))


class MambaMixer(nn.Module):
    """Mamba-1 mixer: in_proj -> causal depthwise conv + SiLU -> selective scan -> gate -> out."""

    def __init__(self, config: SessaConfig):
        super().__init__()
        D, N, K = config.hidden_size, config.state_size, config.conv_kernel
        E, R = config.expand * D, config.time_step_rank
        self.E, self.N, self.R, self.K = E, N, R, K
        self.in_proj = nn.Linear(D, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, K, groups=E, padding=K - 1)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E)
        self.A_log = nn.Parameter(torch.zeros(E, N))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, D, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        B, T, _ = u.shape
        E, N, R = self.E, self.N, self.R
        x, z = self.in_proj(u).split(E, dim=-1)
        xc = F.silu(self.conv1d(x.transpose(1, 2))[..., :T].transpose(1, 2))  # (B, T, E)
        dt_in, Bm, Cm = self.x_proj(xc).split([R, N, N], dim=-1)
        acc = _acc_dtype(u)
        # dt_proj's bias is added in the scan precision (as the JAX model does)
        dt = F.softplus(F.linear(dt_in, self.dt_proj.weight).to(acc) + self.dt_proj.bias.to(acc))
        A = -torch.exp(self.A_log.to(acc))
        xa, Ba, Ca = xc.to(acc), Bm.to(acc), Cm.to(acc)
        h = torch.zeros(B, E, N, dtype=acc, device=u.device)
        ys = []
        for t in range(T):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * xa[:, t])[..., None] * Ba[:, t, None, :]
            ys.append(torch.einsum("ben,bn->be", h, Ca[:, t]))
        y = torch.stack(ys, dim=1) + self.D.to(acc) * xa
        y = y * F.silu(z.to(acc))
        return self.out_proj(y.to(u.dtype))


class SessaBlock(nn.Module):
    """Sessa layer (names as the author's reference: ln, W_in, mixer, W_out) [+ MLP block]."""

    def __init__(self, config: SessaConfig):
        super().__init__()
        D = config.hidden_size
        self.ln = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.W_in = nn.Linear(D, 2 * D)
        self.mixer = SessaMixer(config)
        self.W_out = nn.Linear(D, D)
        self.mlp = MLP(config) if config.intermediate_size else None

    def forward(self, x):
        a, g = self.W_in(self.ln(x)).chunk(2, dim=-1)
        x = x + self.W_out(self.mixer(F.gelu(a)) * g)
        return self.mlp(x) if self.mlp is not None else x


class AttentionBlock(nn.Module):
    def __init__(self, config: SessaConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.mlp = MLP(config) if config.intermediate_size else None

    def forward(self, x):
        x = x + self.self_attn(self.ln(x))
        return self.mlp(x) if self.mlp is not None else x


class MambaBlock(nn.Module):
    def __init__(self, config: SessaConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mixer = MambaMixer(config)
        self.mlp = MLP(config) if config.intermediate_size else None

    def forward(self, x):
        x = x + self.mixer(self.ln(x))
        return self.mlp(x) if self.mlp is not None else x


_BLOCKS = {"sessa": SessaBlock, "transformer": AttentionBlock, "mamba": MambaBlock}


class SessaPreTrainedModel(PreTrainedModel):
    config_class = SessaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SessaBlock", "AttentionBlock", "MambaBlock"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no KV cache: every step recomputes the sequence

    def _init_weights(self, module):
        # Fresh (not loaded) weights: PyTorch's defaults, as sessa_jax initialises its Linears;
        # the embedding N(0, 0.02) as sessa_jax's.
        if isinstance(module, nn.Embedding):
            with torch.no_grad():
                module.weight.normal_(0.0, 0.02)


class SessaModel(SessaPreTrainedModel):
    """Embedding -> blocks -> final LayerNorm: (B, T) ids -> (B, T, D) hidden states."""

    def __init__(self, config: SessaConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_BLOCKS[config.family](config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class SessaForCausalLM(SessaPreTrainedModel, GenerationMixin):
    """Causal LM: logits (B, T, V) in float32; the tied head reuses the embedding matrix."""

    def __init__(self, config: SessaConfig):
        super().__init__(config)
        self.model = SessaModel(config)
        D, V = config.hidden_size, config.vocab_size
        # Tied: logits = h E^T computed from the embedding itself (no second tensor to tie).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(D, V, bias=False)
        self.cls_head = nn.Linear(D, config.num_classes) if config.num_classes else None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def tie_weights(self, *args, **kwargs):
        pass  # nothing to tie: a tied head reads model.embed_tokens.weight directly

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, return_dict: Optional[bool] = None,
                **kwargs):
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("padded inputs are not supported: every row must be real tokens "
                             "(batch prompts of equal length, or run them one by one)")
        h = self.model(input_ids)
        if self.lm_head is not None:
            logits = self.lm_head(h)
        else:
            logits = F.linear(h, self.model.embed_tokens.weight)
        logits = logits.float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return CausalLMOutput(loss=loss, logits=logits)
