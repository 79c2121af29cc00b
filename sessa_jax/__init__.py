"""sessa_jax: Sessa (Selective State Space Attention) in JAX/Flax NNX."""

__version__ = "0.1.0"
