"""The example format shared by every task and the training loop.

An example is a dict of NumPy arrays, each of shape (T,) with T = ``DataConfig.seq_len``:

- ``inputs``    int32: token ids fed to the model, padded at the end with the task's pad id;
- ``targets``   int32: the token the model must predict at each position (the next token),
  pad id past the end of the sequence;
- ``loss_mask`` float32: 1 where the position is scored, 0 elsewhere (padding, prompts).

A batch is the same dict with a leading batch axis: (B, T). Accuracy is ``argmax == targets``
at positions where ``loss_mask == 1``; :func:`sequence_correct` gives the per-example
"all answers right" score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KEYS = ("inputs", "targets", "loss_mask")


def make_example(seq: Sequence[int], scored: Sequence[int], seq_len: int, pad_id: int = 0) -> dict:
    """Turn a full token sequence into an example.

    Args:
      seq: the whole sequence s_0..s_n (n <= seq_len), answers included; inputs are s_0..s_{n-1}
        and targets s_1..s_n, so the last token is only ever a target.
      scored: input positions t whose target s_{t+1} is scored.
      seq_len: T, the length of every returned array.
      pad_id: id used to pad inputs and targets.

    Returns:
      {"inputs": int32 (T,), "targets": int32 (T,), "loss_mask": float32 (T,)}.
    """
    seq = np.asarray(seq, dtype=np.int32)
    n = seq.shape[0] - 1
    if n > seq_len:  # a generator bug, not a user error: the configs check lengths up front
        raise AssertionError(f"sequence of {n} input tokens does not fit seq_len={seq_len}")
    inputs = np.full(seq_len, pad_id, np.int32)
    targets = np.full(seq_len, pad_id, np.int32)
    inputs[:n] = seq[:-1]
    targets[:n] = seq[1:]
    loss_mask = np.zeros(seq_len, np.float32)
    loss_mask[np.asarray(scored, dtype=np.int64)] = 1.0
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def row_example(row: np.ndarray, pad_id: int) -> dict:
    """A packed LM row of T+1 tokens -> example; every real next token is scored.

    The pad id never occurs in tokenized text, so targets equal to it are padding of the final
    partial row and get loss_mask 0.
    """
    row = np.asarray(row, dtype=np.int32)
    inputs, targets = row[:-1].copy(), row[1:].copy()
    return {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": (targets != pad_id).astype(np.float32),
    }


def sequence_correct(pred, targets, loss_mask):
    """Per-example "every scored position right".

    Works on NumPy and jax.numpy arrays alike (only array methods are used).

    Args:
      pred: (..., T) predicted ids (e.g. ``logits.argmax(-1)``).
      targets: (..., T) target ids.
      loss_mask: (..., T) 1 where scored.

    Returns:
      bool (...,): True where all scored positions match. An example with no scored position
      (a padding row of a final eval batch) counts as False, so
      ``sequence_correct(...).sum() / num_scored_examples(loss_mask)`` is the sequence accuracy.
    """
    scored = loss_mask > 0
    ok = (pred == targets) | ~scored
    return ok.all(axis=-1) & scored.any(axis=-1)


def num_scored_examples(loss_mask):
    """Number of examples (rows) with at least one scored position: (..., T) -> scalar."""
    return (loss_mask > 0).any(axis=-1).sum()


def masked_accuracy(pred, targets, loss_mask):
    """Token accuracy over scored positions: (sum correct, sum scored), both scalars."""
    correct = ((pred == targets) * (loss_mask > 0)).sum()
    return correct, (loss_mask > 0).sum()
