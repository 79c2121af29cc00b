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

STEPS = 16
KILLS = 4
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
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"):
        e.pop(k, None)
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


def test_corrupted_shard_saves_the_last_step_and_skip_finishes(tmp_path, capsys):
    from sessa_jax.data.text import prepare_text
    from sessa_jax.train import cli

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    r = random.Random(0)
    for i in range(2):
        (corpus / f"{i}.txt").write_text(" ".join(r.choice(["alpha", "beta", "gamma"])
                                                  for _ in range(2500)))
    prep = tmp_path / "prep"
    meta = prepare_text([str(corpus / "*.txt")], str(prep), seq_len=16, records_per_shard=100,
                        valid_fraction=0.05)
    bad = prep / meta["shards"]["train"][2]  # rows 200..299: read at steps 25..37 (batch 8)
    data = bytearray(bad.read_bytes())
    data[2000:2400] = bytes(400)
    bad.write_bytes(bytes(data))
    cfg = {**CONFIG, "data": {"task": "text", "seq_len": 16, "num_eval_examples": 8,
                              "shuffle": False, "text": {"paths": [str(prep)]}},
           "checkpoint": {"every_steps": 10, "keep_last": 3}}
    cfg["run"] = {**CONFIG["run"], "steps": 45, "log_every": 5}
    path = tmp_path / "text.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    code = cli.train_main(["--config", str(path), f"run.output_dir={run}"])
    out, err = capsys.readouterr()
    assert code == 3, out + err
    line = [x for x in err.splitlines() if "error:" in x]
    assert len(line) == 1 and f"{bad}: record " in line[0] and "is unreadable" in line[0], err
    steps = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
    failed_at = steps[-1]
    assert 20 < failed_at < 40 and failed_at % 10, steps  # the last good step, not a periodic save
    assert f"saved a checkpoint of step {failed_at}, the last completed step" in out
    with pytest.warns(RuntimeWarning, match=r"skipping an unreadable record \(data.on_bad_record"
                                            r"=skip\): .*record \d+ \(train row \d+\)"):
        code = cli.train_main(["--config", str(path), f"run.output_dir={run}",
                               "data.on_bad_record=skip"])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert f"resumed from step {failed_at}" in out and "unreadable data records skipped" in out
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
    """40 random corruptions of one ArrayRecord shard (1, 4 or 400 bytes at a random offset):
    opening or reading raises a DataError naming the shard (and the record), or every record
    reads back unchanged. None decodes as other tokens (Riegeli hashes every chunk)."""
    from sessa_jax.data import DataError
    from sessa_jax.data.text import _Rows, prepare_text

    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(random.Random(1).choice(["ab", "cd", "efg"]) for _ in range(4000)))
    prep = tmp_path / "prep"
    meta = prepare_text([str(corpus)], str(prep), seq_len=16, records_per_shard=200,
                        valid_fraction=0.0)
    name = meta["shards"]["train"][0]
    n0 = min(200, meta["rows"]["train"])
    good = bytes((prep / name).read_bytes())
    want = [_Rows(str(prep), [name], n0, 17)[i] for i in range(n0)]
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
            rows = _Rows(str(prep), [name], n0, 17)
            got = [rows[i] for i in range(n0)]
        except DataError as e:
            assert str(prep / name) in str(e) and "\n" not in str(e), str(e)
            tally["detected"] += 1
            continue
        assert all(np.array_equal(a, b) for a, b in zip(got, want))  # never silently different
        tally["harmless"] += 1
    print("shard corruption trial:", tally)
    assert tally["detected"] >= 5, tally
