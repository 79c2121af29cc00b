"""Tests of sessa_jax.data: configs, task generators, text packing/shards, step-pure pipeline."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest

from sessa_jax.data import (
    DataConfig,
    DataError,
    MQARConfig,
    PasskeyConfig,
    SelectiveCopyConfig,
    SymbolSoupConfig,
    TextConfig,
    batches,
    dataset,
    eval_batches,
    make_task,
    num_eval_batches,
    num_scored_examples,
    permute_index,
    sequence_correct,
)
from sessa_jax.data.tasks import mqar, passkey, selective_copy, symbol_soup as ss
from sessa_jax.data.packing import PackedRows
from sessa_jax.data.text import read_corpus, read_options
from sessa_jax.data.tokenizer import ByteTokenizer

SYNTHETIC = ("symbol_soup", "mqar", "selective_copy", "passkey")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_cfg(task, seq_len=64, **kw):
    kw.setdefault("mqar", MQARConfig(num_pairs=4, key_vocab=16, value_vocab=16))
    kw.setdefault("selective_copy", SelectiveCopyConfig(num_data_tokens=4, vocab=8))
    kw.setdefault("passkey", PasskeyConfig(digits=3))
    return DataConfig(task=task, seq_len=seq_len, num_threads=1, prefetch=4, **kw)


def assert_example_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kwargs, needle", [
    (dict(task="nope"), "data.task='nope'"),
    (dict(seq_len=0), "data.seq_len=0"),
    (dict(seed=-1), "data.seed=-1"),
    (dict(num_train_examples=0), "data.num_train_examples=0"),
    (dict(task="mqar", seq_len=64, mqar=MQARConfig(num_pairs=40)),
     "data.mqar.num_pairs=40 (num_queries=40) does not fit seq_len=64: needs at least 160"),
    (dict(task="symbol_soup", seq_len=8), "does not fit seq_len=8"),
    (dict(task="symbol_soup", seq_len=64, symbol_soup=SymbolSoupConfig(max_len=100)),
     "data.symbol_soup.max_len=100 exceeds seq_len=64"),
    (dict(task="selective_copy", seq_len=20, selective_copy=SelectiveCopyConfig()),
     "data.selective_copy.num_data_tokens=16"),
    (dict(task="passkey", seq_len=10), "data.passkey.digits=5 does not fit seq_len=10"),
    (dict(task="text"), "data.text.paths is empty"),
])
def test_config_errors_name_the_field(kwargs, needle):
    with pytest.raises(ValueError) as e:
        DataConfig(**kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize("make, needle", [
    (lambda: MQARConfig(num_pairs=10, key_vocab=4), "data.mqar.num_pairs=10 exceeds"),
    (lambda: MQARConfig(num_queries=9, num_pairs=8), "data.mqar.num_queries=9"),
    (lambda: MQARConfig(layout="x"), "data.mqar.layout='x'"),
    (lambda: SymbolSoupConfig(noise_min=0.7), "data.symbol_soup.noise_min=0.7"),
    (lambda: PasskeyConfig(min_depth=1.5), "data.passkey.min_depth=1.5"),
    (lambda: TextConfig(on_bad_file="ignore"), "data.text.on_bad_file='ignore'"),
    (lambda: TextConfig(valid_fraction=1.0), "data.text.valid_fraction=1.0"),
])
def test_nested_config_errors(make, needle):
    with pytest.raises(ValueError) as e:
        make()
    assert needle in str(e.value)


def test_text_config_accepts_lists():
    tc = TextConfig(paths=["a.txt", "b/*.txt"])
    assert tc.paths == ("a.txt", "b/*.txt")
    hash(tc)  # frozen and hashable


# ---------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", SYNTHETIC)
def test_examples_are_deterministic_and_well_formed(task):
    t = make_task(small_cfg(task))
    a = t.example("train", 7)
    assert_example_equal(a, make_task(small_cfg(task)).example("train", 7))
    assert not np.array_equal(a["inputs"], t.example("valid", 7)["inputs"])
    assert not np.array_equal(a["inputs"], t.example("test", 7)["inputs"])
    assert not np.array_equal(a["inputs"], t.example("train", 8)["inputs"])
    other_seed = make_task(dataclasses.replace(small_cfg(task), seed=1))
    assert not np.array_equal(a["inputs"], other_seed.example("train", 7)["inputs"])
    for i in range(5):
        ex = t.example("valid", i)
        assert ex["inputs"].dtype == np.int32 and ex["inputs"].shape == (64,)
        assert ex["targets"].dtype == np.int32 and ex["targets"].shape == (64,)
        assert ex["loss_mask"].dtype == np.float32 and ex["loss_mask"].shape == (64,)
        assert ex["inputs"].max() < t.vocab_size and ex["targets"].max() < t.vocab_size
        # targets are the next token wherever the next token is an input
        n = int((ex["inputs"] != t.pad_id).sum())
        np.testing.assert_array_equal(ex["targets"][: n - 1], ex["inputs"][1:n])
        assert ex["loss_mask"].sum() >= 1
        assert (ex["targets"][ex["loss_mask"] > 0] != t.pad_id).all()
    assert len(t.token_names()) == t.vocab_size
    assert isinstance(t.decode(a["inputs"]), str)


def test_symbol_soup_style_tables():
    assert len(ss.MOTIFS) == 39
    assert ss.make_styles(123, 4) == ss.LEFT_STYLES and ss.make_styles(456, 5) == ss.RIGHT_STYLES
    assert len({s.order for s in ss.LEFT_STYLES + ss.RIGHT_STYLES}) == 9
    st = ss.LEFT_STYLES[0]
    assert sorted(st.order) == list(range(16))
    assert [st.unigram[s] for s in st.primaries] == [3.0] * 4
    assert [st.unigram[s] for s in st.secondaries] == [2.0] * 4
    assert (st.primaries[0], st.primaries[1]) in st.bigrams
    assert (st.secondaries[2], st.primaries[2]) in st.bigrams
    # weights favour primaries over secondaries over the rest, in long blocks of every style
    for style in ss.LEFT_STYLES + ss.RIGHT_STYLES:
        blk = ss.stylised_block(ss._Sampler(style, 4.0), 2000, np.random.default_rng(0))
        c = np.bincount(blk, minlength=16)
        rest = np.delete(c, list(style.order[:8]))
        assert c[list(style.primaries)].mean() > c[list(style.secondaries)].mean() > rest.mean()


def test_symbol_soup_structure():
    cfg = small_cfg("symbol_soup", seq_len=96)
    t = make_task(cfg)
    assert (t.min_len, t.max_len) == (64, 96) and t.vocab_size == 44
    labels = []
    for i in range(200):
        s = t.sample("train", i)
        labels.append(s.label)
        assert s.label == 5 * s.left + s.right
        toks = s.tokens
        assert t.min_len <= len(toks) <= t.max_len
        specials = toks[toks < ss.SYMBOL0]
        np.testing.assert_array_equal(
            specials, [ss.BOS, ss.SEP1, ss.SEP2, ss.SEP1, ss.SEP2, ss.SEP, ss.LABEL])
        # the blocks between <sep1> and <sep2> are the left/right style blocks, in drawn order
        sep1 = np.flatnonzero(toks == ss.SEP1)
        sep2 = np.flatnonzero(toks == ss.SEP2)
        b1, b2 = toks[sep1[0] + 1:sep2[0]], toks[sep1[1] + 1:sep2[1]]
        first, second = (s.left_block, s.right_block) if s.left_first else (
            s.right_block, s.left_block)
        np.testing.assert_array_equal(b1 - ss.SYMBOL0, first)
        np.testing.assert_array_equal(b2 - ss.SYMBOL0, second)
        assert min(s.noise_sizes) >= 1 and sum(s.noise_sizes) >= 3
        if i < 20:
            ex = t.example("train", i)
            (pos,) = np.flatnonzero(ex["loss_mask"])
            assert ex["inputs"][pos] == ss.LABEL and pos == len(toks) - 1
            assert ex["targets"][pos] == ss.CLASS0 + s.label
    assert np.bincount(labels, minlength=20).tolist() == [10] * 20  # balanced per run of 20


def test_symbol_soup_labels_match_styles_and_lengths_are_configurable():
    t = make_task(small_cfg("symbol_soup", seq_len=1024))
    logp = lambda st, blk: np.log(np.asarray(st.unigram) / sum(st.unigram))[blk].sum()
    hits = 0
    for i in range(20):
        s = t.sample("valid", i)
        hits += np.argmax([logp(st, s.left_block) for st in ss.LEFT_STYLES]) == s.left
        hits += np.argmax([logp(st, s.right_block) for st in ss.RIGHT_STYLES]) == s.right
    assert hits >= 30  # of 40: a unigram classifier recovers the labelled styles
    # train short, evaluate long: explicit min/max_len are honoured
    cfg = small_cfg("symbol_soup", seq_len=256,
                    symbol_soup=SymbolSoupConfig(min_len=200, max_len=210))
    lens = [(make_task(cfg).example("test", i)["inputs"] != 0).sum() for i in range(10)]
    assert all(200 <= n <= 210 for n in lens)


@pytest.mark.parametrize("layout", ["spread", "packed"])
def test_mqar_targets_are_the_queried_values(layout):
    cfg = small_cfg("mqar", mqar=MQARConfig(num_pairs=6, num_queries=4, key_vocab=32,
                                            value_vocab=8, layout=layout))
    t = make_task(cfg)
    assert t.vocab_size == 3 + 32 + 8
    for i in range(10):
        ex = t.example("train", i)
        kv = ex["inputs"][1:13].reshape(6, 2)
        assert (kv[:, 0] >= mqar.KEY0).all() and (kv[:, 0] < t.value0).all()
        assert (kv[:, 1] >= t.value0).all()
        table = dict(kv.tolist())
        assert len(table) == 6  # distinct keys
        pos = np.flatnonzero(ex["loss_mask"])
        assert len(pos) == 4 and (pos > 12).all()
        queried = ex["inputs"][pos]
        assert len(set(queried.tolist())) == 4
        assert [table[k] for k in queried.tolist()] == ex["targets"][pos].tolist()
        if layout == "packed":
            assert pos.tolist() == [13, 15, 17, 19]


def test_selective_copy_targets_are_the_data_in_order():
    t = make_task(small_cfg("selective_copy"))
    for i in range(10):
        ex = t.example("valid", i)
        pos = np.flatnonzero(ex["loss_mask"])
        assert len(pos) == 4 and ex["inputs"][pos[0]] == selective_copy.COPY
        region = ex["inputs"][1:pos[0]]
        assert len(region) == 64 - 1 - 4
        data = region[region != selective_copy.NOISE]
        np.testing.assert_array_equal(ex["targets"][pos], data)
        np.testing.assert_array_equal(ex["inputs"][pos[1:]], data[:-1])  # teacher forced


def test_passkey_targets_depth_and_length():
    t = make_task(small_cfg("passkey", passkey=PasskeyConfig(digits=3, min_len=30)))
    for i in range(5):
        ex = t.example("train", i)
        inp = ex["inputs"]
        k0 = int(np.flatnonzero(inp == passkey.KEY)[0])
        key = inp[k0 + 1:k0 + 4]
        assert inp[k0 + 4] == passkey.KEY_END
        pos = np.flatnonzero(ex["loss_mask"])
        assert inp[pos[0]] == passkey.QUERY
        np.testing.assert_array_equal(ex["targets"][pos], key)
        assert 30 <= (inp != 0).sum() <= 64
    lo = t.example_at("test", 3, depth=0.0, length=40)
    hi = t.example_at("test", 3, depth=1.0, length=40)
    assert (lo["inputs"] != 0).sum() == 40 and (hi["inputs"] != 0).sum() == 40
    assert lo["inputs"][1] == passkey.KEY  # right after <bos>
    q = int(np.flatnonzero(hi["inputs"] == passkey.QUERY)[0])
    assert hi["inputs"][q - 1] == passkey.KEY_END  # right before <query>
    m = lo["loss_mask"] > 0
    np.testing.assert_array_equal(lo["targets"][m], hi["targets"][hi["loss_mask"] > 0])
    with pytest.raises(ValueError, match="length=200"):
        t.example_at("test", 3, length=200)


def test_sequence_correct_numpy_and_jax():
    targets = np.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    mask = np.array([[0, 1, 1], [0, 1, 1], [0, 0, 0]], np.float32)
    pred = np.array([[9, 2, 3], [1, 2, 4], [1, 2, 3]])
    assert sequence_correct(pred, targets, mask).tolist() == [True, False, False]
    assert int(num_scored_examples(mask)) == 2
    import jax.numpy as jnp
    got = sequence_correct(jnp.asarray(pred), jnp.asarray(targets), jnp.asarray(mask))
    assert np.asarray(got).tolist() == [True, False, False]


# ---------------------------------------------------------------------------- pipeline


def test_permute_index_is_a_bijection_per_epoch():
    for n in (1, 2, 5, 37, 64):
        p0 = [permute_index(i, n, seed=3, epoch=0) for i in range(n)]
        assert sorted(p0) == list(range(n))
    p0 = [permute_index(i, 37, 3, 0) for i in range(37)]
    assert p0 != [permute_index(i, 37, 3, 1) for i in range(37)]
    assert p0 != [permute_index(i, 37, 4, 0) for i in range(37)]
    assert p0 != list(range(37))


def test_batches_are_a_pure_function_of_the_step():
    # 10 train examples, batches of 4: steps wrap around epochs of a shuffled index space
    cfg = small_cfg("mqar", seq_len=32, num_train_examples=10)
    task = make_task(cfg)
    ds = dataset(cfg, "train", 4, task=task)
    it = batches(cfg, "train", 4, start_step=0, task=task)
    run = [next(it) for _ in range(6)]
    for s in (0, 3, 5):
        assert_example_equal(run[s], ds[s])
        assert_example_equal(run[s], next(batches(cfg, "train", 4, start_step=s, task=task)))
    assert run[0]["inputs"].shape == (4, 32) and run[0]["loss_mask"].dtype == np.float32
    # each epoch of 10 positions visits every example once
    seen = [row.tobytes() for b in run[:5] for row in b["inputs"]]  # positions 0..19
    assert len(set(seen[:10])) == 10 and set(seen[:10]) == set(seen[10:20])
    assert seen[:10] != seen[10:20]  # but in a fresh order
    # two processes' local batches concatenate to the one-process global batch
    for s in (0, 4):
        parts = [next(batches(cfg, "train", 4, s, process_index=p, process_count=2, task=task))
                 for p in range(2)]
        assert parts[0]["inputs"].shape == (2, 32)
        joined = {k: np.concatenate([parts[0][k], parts[1][k]]) for k in parts[0]}
        assert_example_equal(joined, run[s])
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        batches(cfg, "train", 4, process_count=3, task=task)


def test_eval_batches_cover_the_valid_split_in_order():
    cfg = small_cfg("selective_copy", seq_len=32, num_eval_examples=5)
    task = make_task(cfg)
    assert num_eval_batches(cfg, 4, task=task) == 2
    got = list(eval_batches(cfg, 4, task=task))
    assert len(got) == 2 and all(b["inputs"].shape == (4, 32) for b in got)
    rows = [b["inputs"][r] for b in got for r in range(4)]
    for i in range(5):
        np.testing.assert_array_equal(rows[i], task.example("valid", i)["inputs"])
    assert got[1]["loss_mask"][1:].sum() == 0 and int(num_scored_examples(got[1]["loss_mask"])) == 1
    halves = [list(eval_batches(cfg, 4, p, 2, task=task)) for p in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([halves[0][1]["inputs"], halves[1][1]["inputs"]]), got[1]["inputs"])


# ---------------------------------------------------------------------------- text


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo wörld ✓ 😀 \n\t"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < tok.vocab_size == 259
    assert tok.decode(ids) == text
    assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])) == text


def test_packed_rows_segments_and_masks():
    # two documents (with their <eos> = 2), the second stored as two records of <= 4 tokens
    docs = [np.arange(3, 10, dtype=np.int32), np.arange(20, 25, dtype=np.int32)]
    recs = [np.append(docs[0], 2), np.array([20, 21, 22, 23]), np.array([24, 2])]
    rows = PackedRows([8, 4, 2], [True, True, False], recs.__getitem__, seq_len=4, pad_id=0)
    stream = np.concatenate([docs[0], [2], docs[1], [2]])  # 14 tokens -> ceil(13/4) = 4 rows
    assert len(rows) == 4
    for r in range(4):
        tokens, seg, pos = rows.tokens_and_segments(r)
        want = np.zeros(5, np.int32)
        want[:min(5, 14 - 4 * r)] = stream[4 * r:4 * r + 5]
        np.testing.assert_array_equal(tokens, want)
    ex = rows.example(1)  # stream[4:9] = 7 8 9 <eos> | 20: a boundary inside the row
    assert ex["inputs"].tolist() == [7, 8, 9, 2] and ex["targets"].tolist() == [8, 9, 2, 20]
    assert ex["segment_ids"].tolist() == [1, 1, 1, 1] and ex["positions"].tolist() == [0, 1, 2, 3]
    # the last token predicts its <eos>; <eos> does not predict the next document
    assert ex["loss_mask"].tolist() == [1, 1, 1, 0]
    ex = rows.example(2)  # stream[8:13] = 20 21 22 23 | 24: two records of one document
    assert ex["segment_ids"].tolist() == [1, 1, 1, 1] and ex["positions"].tolist() == [0, 1, 2, 3]
    assert ex["loss_mask"].tolist() == [1, 1, 1, 1]
    ex = rows.example(3)  # stream[12:14] = 24 <eos>, then padding
    assert ex["inputs"].tolist() == [24, 2, 0, 0] and ex["targets"].tolist() == [2, 0, 0, 0]
    assert ex["segment_ids"].tolist() == [1, 1, 0, 0] and ex["loss_mask"].tolist() == [1, 0, 0, 0]
    # a row holding an <eos> and a new document: segment 2 starts at position 0
    rows3 = PackedRows([8, 4, 2], [True, True, False], recs.__getitem__, seq_len=3, pad_id=0)
    ex = rows3.example(2)  # stream[6:10] = 9 <eos> 20 21
    assert ex["segment_ids"].tolist() == [1, 1, 2] and ex["positions"].tolist() == [0, 1, 0]
    assert ex["loss_mask"].tolist() == [1, 0, 1]
    assert all(v.shape == (3,) for v in ex.values())
    assert ex["segment_ids"].dtype == ex["positions"].dtype == np.int32


def test_text_task_from_raw_files(tmp_path):
    a = write(tmp_path / "a.txt", "The quick brown fox jumps over the lazy dog. " * 20)
    write(tmp_path / "b.txt", "Ünïcödé text, second document.\n" * 10)
    glob_b = str(tmp_path / "b*.txt")
    cfg = small_cfg("text", seq_len=32, text=TextConfig(paths=[a, glob_b], valid_fraction=0.1))
    task = make_task(cfg)
    tok = ByteTokenizer()
    docs = [tok.encode(open(p, encoding="utf-8").read()) for p in (a, str(tmp_path / "b.txt"))]
    stream = np.concatenate([np.append(d, tok.eos_id) for d in docs])
    n_rows = -(-(stream.size - 1) // 32)
    n_valid = int(round(n_rows * 0.1))
    assert task.split_size("train") == n_rows - n_valid and task.split_size("valid") == n_valid
    assert task.vocab_size == 259 and task.report["files_read"] == 2
    ex = task.example("train", 1)
    np.testing.assert_array_equal(ex["inputs"], stream[32:64])
    np.testing.assert_array_equal(ex["targets"], stream[33:65])
    assert ex["loss_mask"].all() and (ex["segment_ids"] == 1).all()
    ex = task.example("valid", 0)
    np.testing.assert_array_equal(task.row("valid", 0)[:-1], ex["inputs"])
    np.testing.assert_array_equal(ex["inputs"], stream[32 * (n_rows - n_valid):][:32])
    assert task.decode(task.row("train", 0)).startswith("The quick")
    with pytest.raises(ValueError, match="only 'train' and 'valid'"):
        task.split_size("test")
    b = next(batches(task.cfg, "train", 2, start_step=1, task=task))
    assert b["inputs"].shape == b["segment_ids"].shape == b["positions"].shape == (2, 32)


@pytest.mark.parametrize("case, needle", [
    ("missing", "missing.txt: file not found"),
    ("glob", "nothing*.txt: glob matched no files"),
    ("empty", "empty.txt: empty file"),
    ("blank", "blank.txt: empty file (only whitespace"),
    ("latin1", "latin1.txt: not valid UTF-8 at byte offset 9 (byte 0xe9: invalid continuation"),
    ("binary", "binary.txt: binary file (NUL byte at offset 3)"),
])
def test_bad_files_error_or_skip(tmp_path, case, needle):
    good = write(tmp_path / "good.txt", "x" * 200)
    bad = {
        "missing": str(tmp_path / "missing.txt"),
        "glob": str(tmp_path / "nothing*.txt"),
        "empty": write(tmp_path / "empty.txt", b""),
        "blank": write(tmp_path / "blank.txt", "  \n\n "),
        "latin1": write(tmp_path / "latin1.txt", b"caf\xc3\xa9 caf\xe9 au lait"),
        "binary": write(tmp_path / "binary.txt", b"abc\x00\x01\x02def"),
    }[case]
    tok = ByteTokenizer()
    err = read_options(TextConfig(paths=[good]))
    skip = read_options(TextConfig(paths=[good], on_bad_file="skip"))
    with pytest.raises(DataError) as e:
        read_corpus([good, bad], tok, err)
    assert needle in str(e.value) and "on_bad_file='skip'" in str(e.value)
    records, _, report = read_corpus([good, bad], tok, skip)
    assert len(records) == 1 and report["files_read"] == 1 and report["files_skipped"] == 1
    assert report["skipped"][0]["path"] == bad
    # the same through the task
    cfg = small_cfg("text", seq_len=32, text=TextConfig(paths=[good, bad], on_bad_file="skip"))
    assert make_task(cfg).report["files_skipped"] == 1
    with pytest.raises(DataError, match="no usable text"):
        read_corpus([bad], tok, skip)


def test_corpus_too_short(tmp_path):
    short = write(tmp_path / "short.txt", "tiny")
    with pytest.raises(DataError, match=r"corpus too short: 5 tokens .*short\.txt.*seq_len\+1=33"):
        make_task(small_cfg("text", seq_len=32, text=TextConfig(paths=[short])))
    one_row = write(tmp_path / "one.txt", "y" * 32)  # 33 tokens: one row, none left for valid
    with pytest.raises(DataError, match="too few to hold out valid_fraction"):
        make_task(small_cfg("text", seq_len=32, text=TextConfig(paths=[one_row])))


def test_missing_tokenizer_file_is_reported_as_a_missing_file(tmp_path):
    """Not as a missing 'sentencepiece' package (the check comes before the import)."""
    from sessa_jax.data import DataError
    from sessa_jax.data.tokenizer import load_tokenizer

    with pytest.raises(DataError, match=r"tokenizer='.*nope.model': file not found"):
        load_tokenizer(str(tmp_path / "nope.model"))
