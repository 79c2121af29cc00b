"""sessa_jax: Sessa (Selective State Space Attention) in JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so ``import sessa_jax`` stays light (no JAX import).
    if name == "load_pretrained":
        from sessa_jax.export import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'sessa_jax' has no attribute {name!r}")
