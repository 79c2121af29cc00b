"""Passkey retrieval: a number hidden at a controlled depth in a long, repetitive filler.

    <bos> filler[:a] <key> d_1..d_k </key> filler[a:] <query> d_1 .. d_k

The filler cycles through ``filler_vocab`` tokens (like a repeated sentence), so the key stands
out only by content. ``a = round(depth * F)`` where F is the filler length; the example's
length L (tokens before padding) fixes F = L - 2k - 3. The ``<query>`` position and the answer
digits d_1..d_{k-1} are scored, with targets d_1..d_k.

Vocabulary (15 + filler_vocab ids):
    0 <pad>, 1 <bos>, 2 <key>, 3 </key>, 4 <query>, digits 0..9 at 5..14, filler F0.. at 15..

For a depth x length heat map, ``example_at(split, index, depth=d, length=L)`` overrides the
drawn depth/length but keeps the same key digits for (split, index) across cells.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sessa_jax.data.config import DataConfig
from sessa_jax.data.examples import make_example
from sessa_jax.data.tasks.base import Task, example_rng

PAD, BOS, KEY, KEY_END, QUERY = 0, 1, 2, 3, 4
DIGIT0 = 5
FILLER0 = 15


class PasskeyTask(Task):
    name = "passkey"
    pad_id = PAD

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.pc = cfg.passkey
        self.min_len, self.max_len = self.pc.lengths(cfg.seq_len)
        self.vocab_size = FILLER0 + self.pc.filler_vocab

    def sample(self, split: str, index: int, depth: Optional[float] = None,
               length: Optional[int] = None):
        """(seq, scored, digits, depth, length) of one example; see the module docstring."""
        pc, k = self.pc, self.pc.digits
        rng = example_rng(self.seed, split, index)
        # Always draw everything in the same order so overrides leave the digits unchanged.
        drawn_len = int(rng.integers(self.min_len, self.max_len + 1))
        drawn_depth = float(rng.uniform(pc.min_depth, pc.max_depth))
        digits = rng.integers(0, 10, size=k)
        offset = int(rng.integers(0, pc.filler_vocab))
        length = drawn_len if length is None else int(length)
        depth = drawn_depth if depth is None else float(depth)
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"passkey depth={depth}: expected a number in [0, 1]")
        if not pc.min_length() <= length <= self.seq_len:
            raise ValueError(
                f"passkey length={length}: expected {pc.min_length()} <= length <= "
                f"seq_len={self.seq_len}"
            )
        n_fill = length - 2 * k - 3
        before = int(round(depth * n_fill))
        filler = FILLER0 + (offset + np.arange(n_fill)) % pc.filler_vocab
        key = digits + DIGIT0
        seq = np.concatenate([
            [BOS], filler[:before], [KEY], key, [KEY_END], filler[before:], [QUERY], key,
        ])
        query_pos = 1 + n_fill + k + 2
        scored = np.arange(query_pos, query_pos + k)
        return seq, scored, key, depth, length

    def example_at(self, split: str, index: int, depth: Optional[float] = None,
                   length: Optional[int] = None) -> dict:
        """Example with the key at ``depth`` (0 = start, 1 = end of the filler) and ``length``
        tokens before padding; None keeps the value drawn for (split, index)."""
        seq, scored, *_ = self.sample(split, index, depth, length)
        return make_example(seq, scored, self.seq_len, PAD)

    def example(self, split: str, index: int) -> dict:
        return self.example_at(split, index)

    def token_names(self) -> list[str]:
        return (["<pad>", "<bos>", "<key>", "</key>", "<query>"] + [str(i) for i in range(10)]
                + [f"F{i}" for i in range(self.pc.filler_vocab)])
