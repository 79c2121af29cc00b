"""SymbolSoup's 'paper' layout (the public generator's text: every symbol, space and newline is
a token). Pinned examples keep the format from drifting; the rest checks balance, determinism,
length bounds and that the layout is the compact one plus whitespace."""

import hashlib
import os

import numpy as np
import pytest

from sessa_jax.data.config import DataConfig, SymbolSoupConfig, soup_tokens
from sessa_jax.data.pipeline import make_task
from sessa_jax.data.tasks import symbol_soup as ss
from sessa_jax.train.config import load_config


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "tasks")


def paper_task(seq_len=40, seed=0, **kw):
    return make_task(DataConfig(task="symbol_soup", seq_len=seq_len, seed=seed,
                                symbol_soup=SymbolSoupConfig(layout="paper", **kw)))


# (seed, split, index) at seq_len=40 -> (label, text, token ids). Regenerating these on purpose
# means the layout changed: say so in RESULTS.md, old paper-layout runs are not comparable.
PINNED = [
    ((0, "train", 0), 8,
     "<bos>\nn l\n<sep1>\np\n<sep2>\nl g\n<sep1>\nk k n m n o\n<sep2>\no\n<sep>\n<label>",
     [1, 45, 21, 44, 19, 45, 2, 45, 23, 45, 3, 45, 19, 44, 14, 45, 2, 45, 18, 44, 18, 44, 21,
      44, 20, 44, 21, 44, 22, 45, 3, 45, 22, 45, 4, 45, 5]),
    ((0, "train", 1), 14,
     "<bos>\ne p\n<sep1>\ne f g l o\n<sep2>\ne l\n<sep1>\no l g\n<sep2>\ne\n<sep>\n<label>",
     [1, 45, 12, 44, 23, 45, 2, 45, 12, 44, 13, 44, 14, 44, 19, 44, 22, 45, 3, 45, 12, 44, 19,
      45, 2, 45, 22, 44, 19, 44, 14, 45, 3, 45, 12, 45, 4, 45, 5]),
    ((7, "valid", 3), 17,
     "<bos>\nf l\n<sep1>\nj k\n<sep2>\ni\n<sep1>\ng i j k p\n<sep2>\nb\n<sep>\n<label>",
     [1, 45, 13, 44, 19, 45, 2, 45, 17, 44, 18, 45, 3, 45, 16, 45, 2, 45, 14, 44, 16, 44, 17,
      44, 18, 44, 23, 45, 3, 45, 9, 45, 4, 45, 5]),
]


@pytest.mark.parametrize("key,label,text,ids", PINNED)
def test_pinned_examples(key, label, text, ids):
    seed, split, index = key
    t = paper_task(seed=seed)
    s = t.sample(split, index)
    assert s.label == label
    assert s.tokens.tolist() == ids
    assert t.render(s.tokens) == text
    ex = t.example(split, index)  # the scored position is <label>, its target CLASS_k
    (pos,) = np.flatnonzero(ex["loss_mask"])
    assert pos == len(ids) - 1 and ex["inputs"][pos] == ss.LABEL
    assert ex["targets"][pos] == ss.CLASS0 + label


def test_pinned_paper_length_example():
    """One example at the paper's T=2048, pinned by a hash of its ids."""
    t = paper_task(seq_len=2048)
    s = t.sample("test", 5)
    assert (len(s.tokens), s.label) == (1703, 3)
    assert t.render(s.tokens[:30]) == "<bos>\nk m o o o c n a e n i k m k "
    assert hashlib.sha256(s.tokens.tobytes()).hexdigest() == (
        "45798caf81b27623216fe586f6b5f190a87f84bab322bf267ac4798a01c5a5b3")


def test_layout_is_compact_plus_whitespace():
    t = paper_task(seq_len=128)
    assert t.vocab_size == ss.PAPER_VOCAB_SIZE == 46 and len(t.token_names()) == 46
    for i in range(30):
        s = t.sample("train", i)
        toks = s.tokens
        assert toks.max() < t.vocab_size
        # no whitespace at either end, never two whitespace tokens in a row
        ws = (toks == ss.SPACE) | (toks == ss.NEWLINE)
        assert not ws[0] and not ws[-1] and not (ws[1:] & ws[:-1]).any()
        # every token that is not a symbol is separated from its neighbours by a newline, and
        # symbols within one segment by spaces
        lines = t.render(toks).split("\n")
        assert len(lines) == 12
        assert [lines[k] for k in (0, 2, 4, 6, 8, 10, 11)] == [
            "<bos>", "<sep1>", "<sep2>", "<sep1>", "<sep2>", "<sep>", "<label>"]
        segs = [lines[k].split(" ") for k in (1, 3, 5, 7, 9)]
        assert all(len(c) == 1 and c in ss.SYMBOLS for seg in segs for c in seg)
        first, second = (s.left_block, s.right_block) if s.left_first else (
            s.right_block, s.left_block)
        assert [ss.SYMBOLS.index(c) for c in segs[1]] == first.tolist()
        assert [ss.SYMBOLS.index(c) for c in segs[3]] == second.tolist()
        assert [len(segs[k]) for k in (0, 2, 4)] == list(s.noise_sizes)
        m = sum(map(len, segs))
        assert len(toks) == soup_tokens("paper", m) == 2 * m + 13
        assert s.label == 5 * s.left + s.right


def test_length_bounds():
    t = paper_task(seq_len=128)
    assert (t.min_len, t.max_len) == (85, 128)
    lens = {len(t.sample("valid", i).tokens) for i in range(60)}
    assert all(85 <= n <= 127 and n % 2 for n in lens) and len(lens) > 5
    t = paper_task(seq_len=512, min_len=300, max_len=302)  # only 301 fits
    assert {len(t.sample("train", i).tokens) for i in range(5)} == {301}
    with pytest.raises(ValueError, match=r"data.symbol_soup.min_len=300, max_len=300: no example"):
        paper_task(seq_len=512, min_len=300, max_len=300)
    with pytest.raises(ValueError, match=r"does not fit seq_len=20.*layout='paper'"):
        paper_task(seq_len=20)  # the shortest paper example has 2*5+13 = 23 tokens
    with pytest.raises(ValueError, match=r"data.symbol_soup.layout='text'"):
        SymbolSoupConfig(layout="text")


def test_determinism_and_splits():
    a, b = paper_task(seq_len=96), paper_task(seq_len=96)
    other_seed = paper_task(seq_len=96, seed=1)
    for i in range(5):
        np.testing.assert_array_equal(a.example("train", i)["inputs"], b.example("train", i)["inputs"])
    # out-of-order access gives the same record (no state between calls)
    np.testing.assert_array_equal(b.example("test", 4)["inputs"], a.example("test", 4)["inputs"])
    rows = {a.sample(sp, i).tokens.tobytes() for sp in ("train", "valid", "test") for i in range(20)}
    assert len(rows) == 60  # splits draw from distinct streams
    assert any(not np.array_equal(a.sample("train", i).tokens, other_seed.sample("train", i).tokens)
               for i in range(5))


def test_paper_splits_are_balanced():
    cfg = load_config(os.path.join(CONFIGS, "symbol_soup_paper-sessa.yaml"))
    d = cfg.data
    assert (d.seq_len, d.symbol_soup.layout) == (2048, "paper")
    assert (d.num_train_examples, d.num_eval_examples) == (20_000, 2_000)
    t = make_task(d)
    assert t.vocab_size <= cfg.model.vocab_size
    for split, n in (("train", 20_000), ("valid", 2_000), ("test", 2_000)):
        assert t.split_size(split) == n
        counts = np.bincount([t.label_of(split, i) for i in range(n)], minlength=20)
        assert counts.tolist() == [n // 20] * 20, split


def test_paper_configs_load_for_every_family():
    for fam in ("sessa", "transformer", "mamba", "mamba2"):
        cfg = load_config(os.path.join(CONFIGS, f"symbol_soup_paper-{fam}.yaml"))
        assert cfg.model.family == fam and cfg.data.symbol_soup.layout == "paper"
        assert cfg.data.seq_len == 2048 and cfg.run.global_batch_size == 16
