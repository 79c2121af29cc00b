"""Flax NNX models: the Sessa layer, the baselines, and the decoder LM that stacks them."""

from sessa_jax.models.attention import AttentionBlock, AttentionCache, CausalSelfAttention
from sessa_jax.models.config import (
    AttentionConfig, Mamba2Config, MambaConfig, ModelConfig, SessaConfig,
)
from sessa_jax.models.lm import Block, DecoderLM, MLPBlock, count_params
from sessa_jax.models.mamba import MambaBlock, MambaCache
from sessa_jax.models.mamba2 import Mamba2Block, Mamba2Cache
from sessa_jax.models.sessa import SessaCache, SessaLayer, SessaMixer

__all__ = [
    "AttentionBlock", "AttentionCache", "AttentionConfig", "Block", "CausalSelfAttention",
    "DecoderLM", "MLPBlock", "Mamba2Block", "Mamba2Cache", "Mamba2Config", "MambaBlock",
    "MambaCache", "MambaConfig", "ModelConfig",
    "SessaCache", "SessaConfig", "SessaLayer", "SessaMixer", "count_params",
]
