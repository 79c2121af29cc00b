"""Data for sessa_jax: synthetic long-context tasks, text LM, and step-pure Grain pipelines.

Every example is a dict of NumPy arrays of length T = ``DataConfig.seq_len``: ``inputs`` int32,
``targets`` int32 (next token), ``loss_mask`` float32 (1 where scored); text adds ``segment_ids``/``positions``; see
:mod:`sessa_jax.data.examples`. Batches at step s are a pure function of (seed, s); see
:mod:`sessa_jax.data.pipeline`.
"""

from sessa_jax.data.config import (
    DataConfig,
    MQARConfig,
    PasskeyConfig,
    SelectiveCopyConfig,
    SymbolSoupConfig,
    TextConfig,
)
from sessa_jax.data.errors import DataError
from sessa_jax.data.examples import (
    make_example,
    masked_accuracy,
    num_scored_examples,
    sequence_correct,
)
from sessa_jax.data.pipeline import (
    batches,
    dataset,
    eval_batches,
    make_task,
    num_eval_batches,
    permute_index,
    task_vocab_size,
)

__all__ = [
    "DataConfig", "MQARConfig", "PasskeyConfig", "SelectiveCopyConfig", "SymbolSoupConfig",
    "TextConfig", "DataError", "make_example", "masked_accuracy", "num_scored_examples",
    "sequence_correct", "batches", "dataset", "eval_batches", "make_task", "num_eval_batches",
    "permute_index", "task_vocab_size",
]
