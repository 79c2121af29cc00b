"""MQAR, multi-query associative recall (Arora et al. 2023, "Zoology").

    <bos> k_1 v_1 ... k_N v_N  [blank ...] q_1 v(q_1) [blank ...] q_2 v(q_2) ... <pad ...>

N distinct keys each get a value (values may repeat); then Q distinct earlier keys are queried,
each followed by its value (teacher forcing, as in Zoology). The position of each query key is
scored, with its value as target. With ``layout='spread'`` the query pairs are scattered at
random over the rest of the sequence with ``<blank>`` filler, so recall distances grow with
seq_len; ``'packed'`` puts them right after the pairs and pads the rest.

Vocabulary (3 + key_vocab + value_vocab ids):
    0 <pad>, 1 <bos>, 2 <blank>, keys K0.. at 3.., values V0.. at 3 + key_vocab..
"""

from __future__ import annotations

import numpy as np

from sessa_jax.data.config import DataConfig
from sessa_jax.data.examples import make_example
from sessa_jax.data.tasks.base import Task, example_rng

PAD, BOS, BLANK = 0, 1, 2
KEY0 = 3


class MQARTask(Task):
    name = "mqar"
    pad_id = PAD

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.mc = cfg.mqar
        self.mc.check_fits(cfg.seq_len)
        self.value0 = KEY0 + self.mc.key_vocab
        self.vocab_size = self.value0 + self.mc.value_vocab

    def sample(self, split: str, index: int):
        """(seq, scored): the full token sequence (int64) and the scored input positions."""
        mc, T = self.mc, self.seq_len
        n, q = mc.num_pairs, mc.queries
        rng = example_rng(self.seed, split, index)
        keys = rng.choice(mc.key_vocab, size=n, replace=False) + KEY0
        values = rng.integers(0, mc.value_vocab, size=n) + self.value0
        asked = rng.choice(n, size=q, replace=False)  # which pairs are queried, in query order
        if mc.layout == "spread":
            # Query pairs take 2 slots each in a region of R input positions (+1 slot past the
            # end for the last value, which is only a target): sorted distinct p_j in
            # [0, R - q] and start_j = p_j + j never overlap.
            region = T - 1 - 2 * n
            p = np.sort(rng.choice(region - q + 1, size=q, replace=False))
            starts = p + np.arange(q)
            tail = np.full(region + 1, BLANK, np.int64)
        else:
            starts = 2 * np.arange(q)
            tail = np.empty(2 * q, np.int64)
        tail[starts] = keys[asked]
        tail[starts + 1] = values[asked]
        kv = np.stack([keys, values], axis=1).reshape(-1)
        seq = np.concatenate([[BOS], kv, tail])
        scored = 1 + 2 * n + starts
        return seq, scored

    def example(self, split: str, index: int) -> dict:
        seq, scored = self.sample(split, index)
        return make_example(seq, scored, self.seq_len, PAD)

    def token_names(self) -> list[str]:
        return (["<pad>", "<bos>", "<blank>"] + [f"K{i}" for i in range(self.mc.key_vocab)]
                + [f"V{i}" for i in range(self.mc.value_vocab)])
