"""Data for sessa_jax: synthetic long-context tasks, text LM, and step-pure Grain pipelines.

Every example is a dict of NumPy arrays of length T = ``DataConfig.seq_len``: ``inputs`` int32,
``targets`` int32 (next token), ``loss_mask`` float32 (1 where scored); text adds
``segment_ids``/``positions``; see :mod:`sessa_jax.data.examples` and
:mod:`sessa_jax.data.packing`. Batches at step s are a pure function of (seed, s); see
:mod:`sessa_jax.data.pipeline`.

Names are imported lazily, so that a preparation worker (``sessa_jax.data.prepare``) imports
neither Grain nor JAX.
"""

import importlib

_WHERE = {
    "DataConfig": "config", "MQARConfig": "config", "PasskeyConfig": "config",
    "SelectiveCopyConfig": "config", "SymbolSoupConfig": "config", "TextConfig": "config",
    "DataError": "errors",
    "make_example": "examples", "masked_accuracy": "examples",
    "num_scored_examples": "examples", "sequence_correct": "examples",
    "batches": "pipeline", "dataset": "pipeline", "eval_batches": "pipeline",
    "make_task": "pipeline", "num_eval_batches": "pipeline", "permute_index": "pipeline",
    "task_vocab_size": "pipeline",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"sessa_jax.data.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sessa_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
