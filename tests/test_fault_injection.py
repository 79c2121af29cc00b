"""Fault injection: runs killed at random points lose nothing; failures exit loudly.

- A tiny run (16 steps, a checkpoint every 2, async saves) is killed with SIGKILL at random
  points (by wall time from start: imports, compilation, steps or a checkpoint write; and by
  step) KILLS times, then finished: its final parameters and every logged loss equal those of an
  uninterrupted run, bit for bit.
- A prepared text corpus with a corrupted shard: the run stops with exit 3, a line naming the
  shard and record, and a checkpoint of the last completed step; resumed with
  data.on_bad_record=skip it finishes and counts the skipped records in its summary.
- SIGTERM during start-up prints a line and exits 143.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import xla_flags

STEPS = 16
KILLS = 2  # one by time, one by progress (the two kinds of kill below)
CONFIG = {
    "model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2},
    "data": {"task": "mqar", "seq_len": 16, "num_eval_examples": 8,
             "mqar": {"num_pairs": 3, "key_vocab": 8, "value_vocab": 8}},
    "optimizer": {"lr": 1e-2, "warmup_steps": 2},
    "checkpoint": {"every_steps": 2, "keep_last": 2},
    "run": {"steps": STEPS, "global_batch_size": 8, "log_every": 1, "eval_every": 0,
            "tensorboard": False},
}


def env(**extra) -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    # no shared compilation cache (conftest.py): JAX writes its entries in place, and a kill
    # mid-write would leave a torn entry that later runs warn about
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS",
              "JAX_COMPILATION_CACHE_DIR"):
        e.pop(k, None)
    e["XLA_FLAGS"] = xla_flags()
    e.update({k: str(v) for k, v in extra.items()})
    return e


def cmd(config, run_dir, *overrides):
    return [sys.executable, "-m", "sessa_jax.train", "--config", str(config),
            f"run.output_dir={run_dir}", *overrides]


def losses(run_dir) -> dict:
    out = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["step"]] = rec["loss"]
    return out


def final_params(run_dir):
    from flax import nnx
    from sessa_jax.train import load_model
    model, _, step = load_model(str(run_dir))
    assert step == STEPS
    return {str(k): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    p = tmp_path_factory.mktemp("fi") / "tiny.yaml"
    p.write_text(yaml.safe_dump(CONFIG))
    return p


def test_sigkill_at_random_points_then_finish_equals_an_uninterrupted_run(config, tmp_path):
    ref = tmp_path / "ref"
    p = subprocess.run(cmd(config, ref), env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    run = tmp_path / "killed"
    rng = random.Random(2026)
    slow = env(SESSA_DEBUG_STEP_SLEEP=0.15)  # steps slow enough to land kills between them
    kills = []
    for i in range(KILLS):
        before = max(losses(run), default=0)
        proc = subprocess.Popen(cmd(config, run), env=slow, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        if i % 2 == 0:  # by time: anywhere from imports to training
            time.sleep(rng.uniform(0.5, 6.0))
        else:  # by progress: a few steps past where the last session got to
            target = min(STEPS - 3, before + rng.randint(1, 4))  # leave time before the end
            deadline = time.time() + 240
            while (max(losses(run), default=0) < target and proc.poll() is None
                   and time.time() < deadline):
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is not None:  # finished before the kill: nothing to test this round
            out = proc.stdout.read()
            assert proc.returncode == 0, out
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        kills.append(max(losses(run), default=0))
    assert len(kills) == KILLS, f"the run finished before all kills: {kills}"
    p = subprocess.run(cmd(config, run), env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1)) and got == want
    a, b = final_params(run), final_params(ref)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    print(f"killed at logged steps {kills}; finished identical to the uninterrupted run")


def _prepared(tmp_path, files: int, words: int, seed: int):
    """A prepared byte-token corpus: one shard per file, records of at most 64 tokens."""
    from sessa_jax.data.prepare import ReadOptions, prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    r = random.Random(seed)
    for i in range(files):
        (corpus / f"{i}.txt").write_text(" ".join(r.choice(["alpha", "beta", "gamma"])
                                                  for _ in range(words)))
    prep = tmp_path / "prep"
    meta = prepare([str(corpus / "*.txt")], str(prep), ReadOptions(max_record_tokens=64),
                   shard_bytes=1, progress=False)
    return prep, meta


def test_corrupted_shard_saves_the_last_step_and_skip_finishes(tmp_path, capsys):
    from sessa_jax.data import DataError
    from sessa_jax.data.prepare import PreparedCorpus
    from sessa_jax.train import cli

    T, G = 16, 8
    prep, meta = _prepared(tmp_path, files=6, words=300, seed=0)  # ~1700 tokens per shard
    bad = prep / meta["shards"][2]["records"]  # train rows ~213..318: steps ~27..40
    data = bytearray(bad.read_bytes())
    end = bytes(data).index(bytes(64))  # the records; then zero padding, then the footer
    data[end // 2:end // 2 + 40] = bytes(40)
    bad.write_bytes(bytes(data))
    corpus = PreparedCorpus(str(prep))
    broken = []
    for i in range(len(corpus)):
        try:
            corpus.read(i)
        except DataError as e:
            assert str(bad) in str(e), e
            broken.append(i)
    assert broken, "the corruption hit no record"
    first = int(np.sum(corpus.lengths[:broken[0]]))  # stream offset of the first bad record
    last_good_step = max(0, -(-(first - T) // T)) // G  # the batch of the first row needing it
    assert 20 < last_good_step < 40 and last_good_step % 10, last_good_step
    cfg = {**CONFIG, "data": {"task": "text", "seq_len": T, "num_eval_examples": 8,
                              "shuffle": False,
                              "text": {"paths": [str(prep)], "valid_fraction": 0.05}},
           "checkpoint": {"every_steps": 10, "keep_last": 3}}
    cfg["run"] = {**CONFIG["run"], "steps": 45, "log_every": 5, "global_batch_size": G}
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    code = cli.train_main(["--config", str(path), f"run.output_dir={run}"])
    out, err = capsys.readouterr()
    assert code == 3, out + err
    line = [x for x in err.splitlines() if "error:" in x]
    assert len(line) == 1 and f"{bad}: record " in line[0] and "is unreadable" in line[0], err
    assert "read for text train row" in line[0], line
    steps = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
    assert steps[-1] == last_good_step, steps  # the last good step, not a periodic save
    assert f"saved a checkpoint of step {last_good_step}, the last completed step" in out
    with pytest.warns(RuntimeWarning, match=r"skipping an unreadable record \(data.on_bad_record"
                                            r"=skip\): .*record \d+ is unreadable .*; read for "
                                            r"text train row \d+"):
        code = cli.train_main(["--config", str(path), f"run.output_dir={run}",
                               "data.on_bad_record=skip"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert f"resumed from step {last_good_step}" in out
    assert "unreadable data records skipped" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 45 and summary["skipped_records"] >= 1


def test_sigterm_during_start_up_says_so(config, tmp_path):
    proc = subprocess.Popen(cmd(config, tmp_path / "r"), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside the imports (JAX, Orbax, Grain take seconds)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (out, err)
    assert "sessa-train: SIGTERM received outside the training loop" in err, err


def test_random_shard_corruptions_name_file_and_record_or_are_harmless(tmp_path):
    """40 random corruptions of one ArrayRecord document shard (1, 4 or 400 bytes at a random
    offset): opening or reading raises a DataError naming the shard (and the record), or every
    record reads back unchanged. None decodes as other tokens (Riegeli hashes every chunk)."""
    from sessa_jax.data import DataError
    from sessa_jax.data.prepare import PreparedCorpus

    prep, meta = _prepared(tmp_path, files=1, words=4000, seed=1)
    name = meta["shards"][0]["records"]
    good = bytes((prep / name).read_bytes())
    corpus = PreparedCorpus(str(prep))
    n0 = len(corpus)
    assert n0 > 100
    want = [corpus.read(i) for i in range(n0)]
    used = max(i for i, b in enumerate(good) if b)  # past this: zero padding
    rng = random.Random(3)
    tally = {"detected": 0, "harmless": 0}
    for _ in range(40):
        data = bytearray(good)
        o = rng.randrange(used)
        for j in range(rng.choice([1, 4, 400])):
            if o + j < len(data):
                data[o + j] = rng.randrange(256)
        (prep / name).write_bytes(bytes(data))
        try:
            corpus = PreparedCorpus(str(prep))
            got = [corpus.read(i) for i in range(n0)]
        except DataError as e:
            assert str(prep / name) in str(e) and "\n" not in str(e), str(e)
            tally["detected"] += 1
            continue
        assert all(np.array_equal(a, b) for a, b in zip(got, want))  # never silently different
        tally["harmless"] += 1
    print("shard corruption trial:", tally)
    assert tally["detected"] >= 5, tally


def test_damaged_shard_index_is_named(tmp_path):
    """The index beside each shard (tokens per record): truncated, garbled or of another length
    is one DataError naming it when the task is built, not a wrong row later."""
    from sessa_jax.data import DataError
    from sessa_jax.data.prepare import PreparedCorpus

    prep, meta = _prepared(tmp_path, files=2, words=300, seed=2)
    idx = prep / meta["shards"][1]["index"]
    good = idx.read_bytes()
    table = np.load(idx)
    for damage, needle in [
        (good[:len(good) // 2], "cannot read this shard index"),
        (b"garbage" * 10, "cannot read this shard index"),
        (None, "meta.json says"),  # one record fewer
        ("zero", "a record has no tokens"),
    ]:
        if damage is None:
            np.save(idx, table[:-1])
        elif damage == "zero":
            t = table.copy()
            t[3, 0] = 0
            np.save(idx, t)
        else:
            idx.write_bytes(damage)
        with pytest.raises(DataError, match=needle) as e:
            PreparedCorpus(str(prep))
        assert str(idx) in str(e.value) and "\n" not in str(e.value), e.value
    idx.write_bytes(good)
    PreparedCorpus(str(prep))
