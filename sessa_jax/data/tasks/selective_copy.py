"""Selective copying (Gu & Dao 2023, "Mamba", section 3.1).

    <bos> [region: D data tokens at random positions among <noise>] <copy> d_1 ... d_D

The region has ``context_len`` tokens (None: seq_len - 1 - D, filling the example). After
``<copy>`` the model reproduces the data tokens in order (teacher forced); the ``<copy>``
position and the answer positions are scored, D positions whose targets are d_1..d_D.

Vocabulary (4 + vocab ids): 0 <pad>, 1 <bos>, 2 <noise>, 3 <copy>, data D0.. at 4..
"""

from __future__ import annotations

import numpy as np

from sessa_jax.data.config import DataConfig
from sessa_jax.data.examples import make_example
from sessa_jax.data.tasks.base import Task, example_rng

PAD, BOS, NOISE, COPY = 0, 1, 2, 3
DATA0 = 4


class SelectiveCopyTask(Task):
    name = "selective_copy"
    pad_id = PAD

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.sc = cfg.selective_copy
        self.sc.check_fits(cfg.seq_len)
        self.region = self.sc.region_len(cfg.seq_len)
        self.vocab_size = DATA0 + self.sc.vocab

    def sample(self, split: str, index: int):
        """(seq, scored, data): full sequence, scored input positions, data tokens (ids)."""
        d, r = self.sc.num_data_tokens, self.region
        rng = example_rng(self.seed, split, index)
        data = rng.integers(0, self.sc.vocab, size=d) + DATA0
        where = np.sort(rng.choice(r, size=d, replace=False))
        region = np.full(r, NOISE, np.int64)
        region[where] = data
        seq = np.concatenate([[BOS], region, [COPY], data])
        scored = np.arange(1 + r, 1 + r + d)  # <copy>, d_1 .. d_{D-1}
        return seq, scored, data

    def example(self, split: str, index: int) -> dict:
        seq, scored, _ = self.sample(split, index)
        return make_example(seq, scored, self.seq_len, PAD)

    def token_names(self) -> list[str]:
        return ["<pad>", "<bos>", "<noise>", "<copy>"] + [f"D{i}" for i in range(self.sc.vocab)]
