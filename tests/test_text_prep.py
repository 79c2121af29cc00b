"""Real-data text path: HF tokenizers, text/JSONL/Parquet inputs, streaming preparation
(parallel == serial, resumable, bad files), read-time packing across host counts."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from sessa_jax.data import DataConfig, DataError, TextConfig, batches, make_task
from sessa_jax.data.prepare import KILL_HOOK, ReadOptions, main as prepare_main, prepare
from sessa_jax.data.sources import read_documents
from sessa_jax.data.tokenizer import HFTokenizer, load_tokenizer, padded_vocab

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
         "rho sigma tau upsilon phi chi psi omega").split()


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corpus(tmp_path, n_files=24, seed=0) -> pathlib.Path:
    """n_files text files of varied length (some longer than a record)."""
    rng = np.random.default_rng(seed)
    d = tmp_path / "corpus"
    d.mkdir(exist_ok=True)
    for i in range(n_files):
        words = rng.choice(WORDS, size=int(rng.integers(5, 400)))
        (d / f"f{i:03d}.txt").write_text(f"doc {i} ü: " + " ".join(words) + "\n")
    return d


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained by scripts/train_tokenizer.py."""
    tmp = tmp_path_factory.mktemp("bpe")
    d = corpus(tmp)
    out = tmp / "tokenizer.json"
    assert script("train_tokenizer").main(["--input", str(d / "*.txt"), "--output", str(out),
                                           "--vocab-size", "300"]) == 0
    return str(out)


def cfg_for(paths, tokenizer="bytes", seq_len=32, **kw):
    return DataConfig(task="text", seq_len=seq_len, num_threads=1, prefetch=4,
                      text=TextConfig(paths=list(paths), tokenizer=tokenizer, **kw))


def files_of(d: pathlib.Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------- tokenizers


def test_hf_tokenizer_round_trip_specials_and_bytes(bpe):
    tok = load_tokenizer(bpe)
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == 300
    text = "alpha beta ü ✓ unseen-word\tZ"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 3 and tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges happened
    # byte-level: token bytes add up to the text's UTF-8 length exactly (bits per byte)
    assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))
    assert padded_vocab(300) == 384 and padded_vocab(384) == 384 and padded_vocab(50257) == 50304


def test_tokenizer_file_errors_are_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, needle in ((str(tmp_path / "none.json"), "cannot read the tokenizer file"),
                         (str(bad), "not a Hugging Face tokenizer.json")):
        with pytest.raises(DataError) as e:
            load_tokenizer(path)
        assert path in str(e.value) and needle in str(e.value) and "\n" not in str(e.value)
    from sessa_jax.train import cli
    code = cli.train_main(["--config", str(ROOT / "configs/tasks/text-sessa.yaml"),
                           f"data.text.paths=[{tmp_path}/x.txt]",
                           f"data.text.tokenizer={tmp_path}/none.json", "--print-config"])
    err = capsys.readouterr().err
    assert code == 3 and "none.json" in err and err.count("\n") == 1, err  # a data error


def test_config_takes_vocab_from_tokenizer_without_reading_corpus(bpe, tmp_path):
    from sessa_jax.train.config import from_dict
    raw = {"model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2},
           "data": {"task": "text", "seq_len": 16,
                    "text": {"paths": [str(tmp_path / "not-there-yet" / "*.txt")],
                             "tokenizer": bpe}}}
    cfg = from_dict(raw)  # the corpus does not exist: the task is built at training start
    assert cfg.model.vocab_size == 384  # tokenizer 300, padded to a multiple of 128
    with pytest.raises(DataError, match="glob matched no files"):
        make_task(cfg.data)


# ---------------------------------------------------------------------------- inputs


def test_jsonl_parquet_and_line_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = tmp_path / "a.jsonl"
    jl.write_text('{"text": "one", "id": 1}\n\n{"text": "two\\nlines"}\n{"text": "  "}\n')
    assert list(read_documents(str(jl))) == ["one", "two\nlines"]
    pqf = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": ["x1", None, "x2"], "n": [1, 2, 3]}), pqf)
    assert list(read_documents(str(pqf), field="body")) == ["x1", "x2"]
    txt = tmp_path / "c.txt"
    txt.write_text("l1\n\nl2\r\nl3")
    assert list(read_documents(str(txt), document="line")) == ["l1", "l2\r", "l3"]
    assert list(read_documents(str(txt))) == ["l1\n\nl2\r\nl3"]
    # globs: sorted, '**' recursive, de-duplicated; problems named, not raised
    from sessa_jax.data.sources import expand_paths
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "deep" / "d.txt").write_text("deep")
    files, problems = expand_paths([str(tmp_path / "**" / "*.txt"), str(txt),
                                    str(tmp_path / "none*.md")])
    assert files == [str(txt), str(tmp_path / "sub" / "deep" / "d.txt")]
    assert problems == [{"path": str(tmp_path / "none*.md"), "reason": "glob matched no files"}]
    # through preparation: one record per document
    out = tmp_path / "prep"
    meta = prepare([str(jl)], str(out), ReadOptions(), progress=False)
    assert meta["documents"] == 2 and meta["files_read"] == 1
    meta = prepare([str(pqf)], str(out), ReadOptions(field="body"), progress=False,
                   overwrite=True)
    assert meta["documents"] == 2 and meta["bytes"] == 4


@pytest.mark.parametrize("name, data, needle, field", [
    ("bin.txt", b"ab\x00cd", "binary file (NUL byte at offset 2)", "text"),
    ("latin.txt", b"ok caf\xe9", "not valid UTF-8 at byte offset 6", "text"),
    ("empty.txt", b"", "empty file (0 bytes)", "text"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": oops}\n', "line 2: not JSON", "text"),
    ("nofield.jsonl", b'{"body": "a"}\n', "line 1: no field 'text'", "text"),
    ("num.jsonl", b'{"text": 3}\n', "line 1: field 'text' is int", "text"),
    ("junk.parquet", b"PAR1 this is not parquet", "not a readable Parquet file", "text"),
    ("nocol.parquet", None, "no column 'text'", "text"),
])
def test_bad_files_stop_or_are_skipped_by_name(tmp_path, capsys, name, data, needle, field):
    d = tmp_path / "in"
    d.mkdir()
    (d / "good.jsonl").write_text('{"text": "fine text here"}\n')
    bad = d / name
    if data is None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": ["x"]}), bad)
    else:
        bad.write_bytes(data)
    args = ["--input", str(d / "*"), "--output", str(tmp_path / "o"), "--workers", "1",
            "--quiet"]
    assert prepare_main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}: {needle}" in err and "on_bad_file='skip'" in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "meta.json").exists()
    assert prepare_main(args + ["--on-bad-file", "skip", "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {bad}: {needle}" in err
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["files_skipped"] == 1 and meta["skipped"][0]["path"] == str(bad)
    assert meta["documents"] == 1


# ---------------------------------------------------------------------------- preparation


def test_two_workers_equal_one_and_prepared_equals_raw(bpe, tmp_path):
    d = corpus(tmp_path, n_files=40, seed=1)
    opts = ReadOptions(tokenizer=bpe, max_record_tokens=64)
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = prepare([str(d / "*.txt")], str(one), opts, workers=1, shard_bytes=2000,
                 progress=False)
    m2 = prepare([str(d / "*.txt")], str(two), opts, workers=2, shard_bytes=2000,
                 progress=False)
    assert len(m1["shards"]) >= 4 and m1["documents"] == 40 and m1["dtype"] == "<u2"
    assert files_of(one) == files_of(two)  # byte for byte, meta.json and plan.json included
    # the prepared corpus reads back as the same rows as tokenizing the files in memory
    raw = make_task(cfg_for([str(d / "*.txt")], bpe, valid_fraction=0.1))
    prepared = make_task(cfg_for([str(one)], bpe, valid_fraction=0.1))
    for split in ("train", "valid"):
        assert prepared.split_size(split) == raw.split_size(split) > 0
        for i in range(raw.split_size(split)):
            a, b = raw.example(split, i), prepared.example(split, i)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{split} {i} {k}")
    # any seq_len from the same preparation
    assert make_task(cfg_for([str(one)], bpe, seq_len=8)).split_size("train") > \
        prepared.split_size("train")
    # the wrong tokenizer is refused, naming both
    with pytest.raises(DataError, match="prepared with tokenizer=.*another one"):
        make_task(cfg_for([str(one)], "bytes"))
    with pytest.raises(DataError, match="already holds a prepared corpus"):
        prepare([str(d / "*.txt")], str(one), opts, progress=False)


def test_killed_preparation_resumes(tmp_path):
    d = corpus(tmp_path, n_files=30, seed=2)
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = ["--input", str(d / "*.txt"), "--output", str(out), "--shard-mb", "0.002",
            "--workers", "1", "--quiet"]
    env = dict(os.environ, **{KILL_HOOK: "3"})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_text.py"), *args], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr  # SIGKILLed while writing shard 3
    names = {x.name for x in out.iterdir()}
    assert {f"shard-{k:05d}.json" for k in range(3)} <= names
    assert "shard-00003.json" not in names and "meta.json" not in names
    assert any(n.endswith(".tmp") for n in names)  # the partial shard
    kept = {k: (out / f"shard-{k:05d}.array_record").stat().st_mtime_ns for k in range(3)}
    assert prepare_main(args[:-3] + ["--workers", "2", "--quiet"]) == 0  # resume, 2 workers
    assert {k: (out / f"shard-{k:05d}.array_record").stat().st_mtime_ns
            for k in range(3)} == kept  # finished shards were not redone
    assert prepare_main([*args[:2], "--output", str(ref), *args[4:]]) == 0
    assert files_of(out) == files_of(ref)
    # another job in the same directory is refused
    (out / "meta.json").unlink()
    assert prepare_main(["--input", str(d / "f00*.txt"), *args[2:]]) == 2


# ---------------------------------------------------------------------------- packing / hosts


def test_resume_on_another_host_count_reads_the_same_rows(tmp_path):
    d = corpus(tmp_path, n_files=20, seed=3)
    out = tmp_path / "prep"
    prepare([str(d / "*.txt")], str(out), ReadOptions(max_record_tokens=50), progress=False)
    cfg = cfg_for([str(out)], seq_len=24, valid_fraction=0.05)
    task = make_task(cfg)
    G, steps = 4, (0, 1, 7, task.split_size("train") // 4 + 3)  # past an epoch boundary
    for s in steps:
        one = next(batches(cfg, "train", G, start_step=s, task=task))
        halves = [next(batches(cfg, "train", G, start_step=s, process_index=p,
                               process_count=2, task=task)) for p in (0, 1)]
        for k in one:
            np.testing.assert_array_equal(one[k], np.concatenate([h[k] for h in halves]),
                                          err_msg=f"step {s} {k}")
    # a run resumed at step 7 on 2 hosts reads what one host reads 7 batches in
    it = batches(cfg, "train", G, task=task)
    for _ in range(7):
        next(it)
    eighth = next(it)
    resumed = [next(batches(cfg, "train", G, start_step=7, process_index=p, process_count=2,
                            task=task)) for p in (0, 1)]
    np.testing.assert_array_equal(eighth["inputs"],
                                  np.concatenate([r["inputs"] for r in resumed]))
    assert any(task.example("train", i)["segment_ids"].max() >= 2  # rows pack several docs
               for i in range(task.split_size("train")))


def test_text_training_runs_with_segment_keys(bpe, tmp_path):
    """The train/eval steps take a text batch (which carries segment_ids/positions)."""
    from sessa_jax.train.config import from_dict
    from sessa_jax.train.loop import train

    d = corpus(tmp_path, n_files=12, seed=4)
    out = tmp_path / "prep"
    prepare([str(d / "*.txt")], str(out), ReadOptions(tokenizer=bpe), progress=False)
    cfg = from_dict({
        "model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2},
        "data": {"task": "text", "seq_len": 16, "num_eval_examples": 8,
                 "text": {"paths": [str(out)], "tokenizer": bpe, "valid_fraction": 0.1}},
        "run": {"steps": 2, "global_batch_size": 4, "eval_every": 0, "tensorboard": False,
                "output_dir": str(tmp_path / "run")},
        "checkpoint": {"every_steps": 0},
    })
    assert cfg.model.vocab_size == 384
    res = train(cfg)
    ev = res.summary["final_eval"]
    assert res.summary["steps"] == 2 and np.isfinite(ev["loss"])
    assert 0 < ev["bits_per_byte"] < 20
