"""Flax NNX models: the Sessa layer, the baselines, and the decoder LM that stacks them."""

from sessa_jax.models.attention import AttentionBlock, AttentionCache, CausalSelfAttention
from sessa_jax.models.config import (
    AttentionConfig, MambaConfig, ModelConfig, SessaConfig,
)
from sessa_jax.models.lm import Block, DecoderLM, MLPBlock, count_params
from sessa_jax.models.mamba import MambaBlock, MambaCache
from sessa_jax.models.sessa import SessaCache, SessaLayer, SessaMixer

__all__ = [
    "AttentionBlock", "AttentionCache", "AttentionConfig", "Block", "CausalSelfAttention",
    "DecoderLM", "MLPBlock", "MambaBlock", "MambaCache", "MambaConfig", "ModelConfig",
    "SessaCache", "SessaConfig", "SessaLayer", "SessaMixer", "count_params",
]
