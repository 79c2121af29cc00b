"""The jitted train step on one CPU device: gradient accumulation and the non-finite guard."""

import json

import jax
import numpy as np
import pytest

from sessa_jax.data import batches
from sessa_jax.train import cli
from sessa_jax.train.config import from_dict
from sessa_jax.train.mesh import batch_sharding, global_batch, make_mesh
from sessa_jax.train.state import decay_mask, init_state, lr_schedule, make_setup
from sessa_jax.train.step import make_train_step

RAW = {
    "model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2},
    "data": {"task": "mqar", "seq_len": 16, "num_eval_examples": 8,
             "mqar": {"num_pairs": 3, "key_vocab": 8, "value_vocab": 8}},
    "optimizer": {"lr": 1e-2, "warmup_steps": 0},
    "mesh": {"data": 1},  # one device, however many this process has
    "run": {"steps": 4, "global_batch_size": 8},
}


def with_(**sections):
    raw = {k: dict(v) for k, v in RAW.items()}
    for name, fields in sections.items():
        raw[name] = {**raw.get(name, {}), **fields}
    return from_dict(raw)


def first_batch(cfg, setup):
    local = next(batches(cfg.data, "train", cfg.run.global_batch_size, num_threads=0))
    # Make microbatches score different numbers of positions (row 0 is in microbatch 0), so a
    # mean of per-microbatch means would differ from the global mean.
    local["loss_mask"][0] = 0.0
    local["loss_mask"][2, :] = (local["targets"][2] != 0).astype(np.float32)
    sharding = batch_sharding(setup.mesh, cfg.mesh.sharding_rules())
    return lambda: global_batch({k: v.copy() for k, v in local.items()}, sharding,
                                cfg.run.global_batch_size)


def run_one(cfg):
    setup = make_setup(cfg, make_mesh(cfg.mesh))
    step = make_train_step(cfg, setup)
    state, m = step(init_state(setup), first_batch(cfg, setup)())
    return setup, step, jax.device_get(state), jax.device_get(m)


def test_grad_accumulation_equals_one_big_batch_and_nan_guard():
    # eps=1 makes Adam's first update about lr * g (not lr * sign(g), which would amplify
    # rounding differences of tiny gradients), so equal updates mean equal gradients.
    # log_every 1: train accuracy is computed on logged steps only
    setup, step, s1, m1 = run_one(with_(optimizer={"grad_accum_steps": 1, "eps": 1.0},
                                        run={"log_every": 1}))
    _, _, s2, m2 = run_one(with_(optimizer={"grad_accum_steps": 2, "eps": 1.0},
                                 run={"log_every": 1}, model={"loss_chunk_size": 5}))
    assert np.isfinite(m1["accuracy"])
    for k in ("loss", "accuracy", "grad_norm", "learning_rate", "scored"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 s2.params, s1.params)
    assert int(s1.step) == 1 and int(s1.skipped) == 0

    # Non-finite guard: a NaN parameter makes the loss NaN; the update is skipped and counted.
    cfg = with_(optimizer={"grad_accum_steps": 1, "eps": 1.0})
    state = init_state(setup)
    params = jax.tree.map(np.array, jax.device_get(state.params))  # writable copies
    params["embed"]["embedding"][3, 0] = np.nan
    state = state.replace(params=jax.device_put(params, setup.shardings.params))
    before = jax.device_get(state)
    state, m = step(state, first_batch(cfg, setup)())
    after = jax.device_get(state)
    assert np.isnan(m["loss"]) and int(m["skipped"]) == 1 and int(m["streak"]) == 1
    assert int(after.step) == 1 and int(after.skipped) == 1 and int(after.streak) == 1
    jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
    jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)


def test_nonfinite_run_stops_with_a_message(tmp_path, capsys, monkeypatch):
    """A NaN parameter makes every step non-finite: the run stops (exit 1) with a message, and
    does not save the non-finite state. (optimizer.lr=inf is now rejected at config time.)"""
    import yaml
    from sessa_jax.train import loop

    real_init = loop.init_state

    def nan_init(setup):
        state = real_init(setup)
        params = jax.tree.map(np.array, jax.device_get(state.params))
        params["embed"]["embedding"][3, 0] = np.nan
        return state.replace(params=jax.device_put(params, setup.shardings.params))

    monkeypatch.setattr(loop, "init_state", nan_init)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(RAW))
    code = cli.train_main(["--config", str(path), "run.steps=6",
                           "run.max_nonfinite_in_a_row=2", "run.log_every=1",
                           f"run.output_dir={tmp_path}/run", "run.tensorboard=false"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "stopping at step 2: 2 steps in a row had a non-finite" in err
    assert "not saving step 3: its parameters are non-finite" in out
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_total"] for r in lines] == [1, 2]
    assert cli.train_main(["--config", str(path), "optimizer.lr=.inf"]) == 2
    assert "optimizer.lr: expected a finite number, got inf" in capsys.readouterr().err


def test_schedule_and_decay_mask():
    cfg = with_(optimizer={"warmup_steps": 2, "min_lr_ratio": 0.1}, run={"steps": 12})
    lr = lr_schedule(cfg.optimizer, cfg.run.steps)
    got = [float(lr(t)) for t in (0, 1, 2, 7, 12, 50)]
    assert got[0] == pytest.approx(5e-3) and got[1] == pytest.approx(1e-2)
    assert got[2] == pytest.approx(1e-2) and 1e-3 < got[3] < 1e-2
    assert got[4] == pytest.approx(1e-3) and got[5] == pytest.approx(1e-3)
    setup = make_setup(cfg, make_mesh(cfg.mesh))
    mask = decay_mask(setup.abstract.params)
    assert mask["blocks"][0]["mixer"]["W_in"]["kernel"] is True
    assert mask["blocks"][0]["mixer"]["W_in"]["bias"] is False
    assert mask["blocks"][0]["mixer"]["ln"]["scale"] is False
    assert mask["embed"]["embedding"] is False


def test_train_accuracy_only_on_logged_steps():
    from sessa_jax.train.step import logged_step

    cfg = with_(run={"steps": 12, "log_every": 5, "eval_every": 4})
    assert [k for k in range(1, 13) if logged_step(cfg, k)] == [4, 5, 8, 10, 12]
    # traced step numbers give the same answer
    traced = jax.jit(lambda k: logged_step(cfg, k))
    assert [k for k in range(1, 13) if bool(traced(k))] == [4, 5, 8, 10, 12]
    # step 1 of a 4-step run with log_every 10 is not logged: no accuracy there
    _, _, _, m = run_one(with_(run={"log_every": 10}))
    assert np.isnan(m["accuracy"]) and np.isfinite(m["loss"])
