"""Flax NNX models: the Sessa layer, baselines, and the decoder LM that stacks them."""

from sessa_jax.models.config import (
    AttentionConfig, MambaConfig, ModelConfig, SessaConfig,
)
from sessa_jax.models.sessa import SessaCache, SessaLayer, SessaMixer

__all__ = [
    "AttentionConfig", "MambaConfig", "ModelConfig", "SessaConfig",
    "SessaCache", "SessaLayer", "SessaMixer",
]
