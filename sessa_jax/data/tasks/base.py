"""What every task shares: split ids, per-example RNGs, and the :class:`Task` interface.

An example is a pure function of (config seed, split, index): its generator seeds
``numpy.random.default_rng([seed, split_id, index, stream])`` and touches no global state, so
any host or thread can produce any record, in any order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sessa_jax.data.config import DataConfig

SPLIT_IDS = {"train": 0, "valid": 1, "test": 2}


def split_id(split: str) -> int:
    """'train' | 'valid' | 'test' -> 0 | 1 | 2 (distinct RNG streams, so splits are disjoint)."""
    try:
        return SPLIT_IDS[split]
    except (KeyError, TypeError):
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLIT_IDS)}") from None


def check_index(index) -> int:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)) or index < 0:
        raise IndexError(f"example index {index!r}: expected an integer >= 0")
    return int(index)


def example_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The RNG of one example; ``stream`` separates independent draws tied to the same index."""
    return np.random.default_rng([seed, split_id(split), check_index(index), stream])


class Task:
    """Interface of a task: a vocabulary and a deterministic ``example(split, index)``.

    Attributes:
      name: the ``DataConfig.task`` value.
      vocab_size: number of token ids; every id in an example is < vocab_size.
      pad_id: id used to pad inputs/targets (loss_mask is 0 there).
      seq_len: T, the length of every example array.
    """

    name: str = ""
    vocab_size: int = 0
    pad_id: int = 0

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.seq_len = cfg.seq_len
        self.seed = cfg.seed

    def split_size(self, split: str) -> int:
        """Size of the split's index space (the pipeline wraps around it, epoch after epoch)."""
        split_id(split)
        return self.cfg.num_train_examples if split == "train" else self.cfg.num_eval_examples

    def example(self, split: str, index: int) -> dict:
        """{"inputs": int32 (T,), "targets": int32 (T,), "loss_mask": float32 (T,)}."""
        raise NotImplementedError

    def pad_example(self) -> dict:
        """An all-pad, unscored example with this task's keys (fills a final eval batch)."""
        t = self.seq_len
        return {"inputs": np.full(t, self.pad_id, np.int32),
                "targets": np.full(t, self.pad_id, np.int32),
                "loss_mask": np.zeros(t, np.float32)}

    def token_names(self) -> list[str]:
        """Name of every id, for debugging: ``token_names()[i]`` is the name of id i."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_pad: bool = True) -> str:
        """Readable rendering of ids (space separated names), for debugging."""
        names = self.token_names()
        return " ".join(
            names[int(i)] if 0 <= int(i) < len(names) else f"<?{int(i)}>"
            for i in np.asarray(ids).reshape(-1)
            if not (skip_pad and int(i) == self.pad_id)
        )
