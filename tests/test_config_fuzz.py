"""Config validation: targeted cases, and a fuzz of random mutations of a valid config.

Every mutation (bad types, out-of-range and non-finite numbers, unknown keys, wrong nesting,
deleted keys) must end in a TrainConfig or a one-line ConfigError/DataError that names what is
wrong, never another exception. A handful go through ``sessa-train --check`` in a subprocess:
exit 0, 2 or 3, one stderr line, no traceback, nothing created on disk.
"""

import copy
import math
import os
import random
import subprocess
import sys

import pytest
import yaml

from sessa_jax.data import DataError
from sessa_jax.train import cli
from sessa_jax.train.config import ConfigError, TrainConfig, from_dict, load_config, to_dict

BASE = {
    "model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2},
    "data": {"task": "mqar", "seq_len": 32, "num_eval_examples": 8,
             "mqar": {"num_pairs": 4, "key_vocab": 16, "value_vocab": 16}},
    "optimizer": {"lr": 1e-3, "warmup_steps": 2},
    "mesh": {"data": 1},
    "checkpoint": {"every_steps": 2, "keep_last": 2},
    "run": {"steps": 4, "global_batch_size": 4, "tensorboard": False},
}
N_IN_PROCESS = 400
N_CLI = 5
BAD_VALUES = [None, "ten", "", -1, 0, 1, -0.5, 2.5, 10**9, 10**30, float("nan"), float("inf"),
              -float("inf"), True, False, [], [1, 2], {}, {"x": 1}, "1e3", ".nan", "-1"]


def leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,)


def sections(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield prefix + (k,)
            yield from sections(v, prefix + (k,))


def set_path(d, path, value):
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


def mutate(rng: random.Random, raw: dict) -> tuple[dict, str]:
    """One to three random mutations of a full config dict -> (dict, description)."""
    raw = copy.deepcopy(raw)
    what = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["value", "value", "value", "unknown", "nesting", "delete"])
        keys = list(leaves(raw))
        if kind == "value" and keys:
            path, v = rng.choice(keys), rng.choice(BAD_VALUES)
            set_path(raw, path, copy.deepcopy(v))
            what.append(f"{'.'.join(map(str, path))}={v!r}")
        elif kind == "unknown":
            secs = [()] + list(sections(raw))
            path = rng.choice(secs)
            node = raw
            for p in path:
                node = node[p]
            if isinstance(node, dict):
                node[rng.choice(["lrr", "stepz", "extra", "d_modle", "x.y"])] = rng.choice(
                    BAD_VALUES)
            what.append(f"unknown key under {'.'.join(path) or 'top level'}")
        elif kind == "nesting":
            secs = list(sections(raw))
            if secs and keys:
                if rng.random() < 0.5:  # a section replaced by a scalar or a list
                    path = rng.choice(secs)
                    set_path(raw, path, rng.choice([3, "run", [1, 2], None]))
                    what.append(f"section {'.'.join(path)} replaced")
                else:  # a leaf moved into another section
                    src, dst = rng.choice(keys), rng.choice(secs)
                    node = raw
                    for p in dst:
                        node = node[p]
                    node[src[-1]] = {"nested": 1}
                    what.append(f"{src[-1]} nested under {'.'.join(dst)}")
        elif kind == "delete" and keys:
            path = rng.choice(keys)
            node = raw
            for p in path[:-1]:
                node = node[p]
            node.pop(path[-1], None)
            what.append(f"deleted {'.'.join(map(str, path))}")
    return raw, "; ".join(what)


def full_base() -> dict:
    raw = to_dict(from_dict(BASE))
    raw["run"]["output_dir"] = "runs/fuzz-never-created"
    return raw


def check_outcome(raw, desc):
    try:
        cfg = from_dict(raw)
    except (ConfigError, DataError) as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 600, f"{desc}: {msg!r}"
        return "error"
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"mutation [{desc}] raised {type(e).__name__}: {e}")
    assert isinstance(cfg, TrainConfig)
    for x in (cfg.optimizer.lr, cfg.optimizer.eps, cfg.model.ln_eps):
        assert math.isfinite(x), desc
    return "ok"


def test_fuzzed_configs_end_in_a_config_or_one_line_error():
    rng = random.Random(13)
    base = full_base()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(N_IN_PROCESS):
        raw, desc = mutate(rng, base)
        outcomes[check_outcome(raw, desc)] += 1
    # Both outcomes occur (mutations can be harmless, e.g. lr=1): the fuzz exercises both paths.
    assert outcomes["error"] > N_IN_PROCESS // 2 and outcomes["ok"] > 0, outcomes


def test_fuzzed_configs_through_the_cli(tmp_path):
    rng = random.Random(7)
    base = full_base()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    codes = []
    for i in range(N_CLI):
        raw, desc = mutate(rng, base)
        path = tmp_path / f"m{i}.yaml"
        path.write_text(yaml.safe_dump(raw))
        out_dir = tmp_path / f"run{i}"
        p = subprocess.run([sys.executable, "-m", "sessa_jax.train", "--config", str(path),
                            "--check", f"run.output_dir={out_dir}"],
                           env=env, capture_output=True, text=True, timeout=240)
        assert "Traceback" not in p.stderr, f"[{desc}]\n{p.stderr[-3000:]}"
        assert p.returncode in (0, 2, 3), f"[{desc}] exit {p.returncode}\n{p.stderr[-3000:]}"
        if p.returncode:
            assert p.stderr.count("\n") == 1 and "sessa-train: error:" in p.stderr, p.stderr
        else:
            assert p.stdout.startswith("ok: "), p.stdout
        assert not out_dir.exists(), f"[{desc}] --check created {out_dir}"
        codes.append(p.returncode)
    assert 2 in codes, codes


# -- targeted cases ----------------------------------------------------------------------------


def write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return str(p)


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=.nan", "optimizer.lr: expected a finite number, got"),
    ("optimizer.lr=inf", "optimizer.lr: expected a finite number, got 'inf'"),
    ("optimizer.lr=0", "optimizer.lr=0.0: expected a finite number > 0"),
    ("optimizer.lr=-1e-3", "optimizer.lr=-0.001: expected a finite number > 0"),
    ("optimizer.weight_decay=1e999", "optimizer.weight_decay: expected a finite number"),
    ("model.gamma_max=.nan", "model.gamma_max: expected a finite number"),
    ("run.steps=1e999", "run.steps: expected int"),
    ("data.seq_len=.inf", "data.seq_len: expected int"),
    ("run.compilation_cache_dir=memory://x",
     "run.compilation_cache_dir='memory://x': expected a local path or a URI"),
    ("run.output_dir=memory://x", "run.output_dir='memory://x': expected a local path or a URI"),
    ("run.stop_check_every=0", "run.stop_check_every=0: expected a positive integer"),
    ("run.profile_steps=[3,1]", "run.profile_steps=[3, 1]: expected null or [a, b] with 0 <= a"),
    ("run.profile_steps=[2,9]", "<= run.steps=4"),
])
def test_non_finite_and_non_positive_numbers_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(write(tmp_path, BASE), [override])
    assert message in str(e.value), str(e.value)


def test_empty_config_and_no_config_are_errors(tmp_path, capsys):
    empty = write(tmp_path, "# nothing here\n", "empty.yaml")
    assert cli.train_main(["--config", empty, f"run.output_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert "empty.yaml' is empty" in err and err.count("\n") == 1
    assert cli.train_main([]) == 2
    err = capsys.readouterr().err
    assert "no --config given" in err and "configs/quickstart.yaml" in err
    assert cli.train_main(["run.steps=3"]) == 2
    assert not (tmp_path / "r").exists() and not os.path.exists("runs/default")


def test_failed_checks_create_nothing(tmp_path, capsys):
    run = tmp_path / "never"
    path = write(tmp_path, BASE)
    assert cli.train_main(["--config", path, "mesh.data=2", f"run.output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "needs 2 devices" in err and "XLA_FLAGS=--xla_force_host_platform_device_count=2" \
        in err, err
    assert cli.train_main(["--config", path, "data.task=text", "data.text.paths=[nope.txt]",
                           f"run.output_dir={run}"]) == 3
    assert "nope.txt: file not found" in capsys.readouterr().err
    assert cli.train_main(["--config", path, "--check", f"run.output_dir={run}"]) == 0
    assert capsys.readouterr().out.startswith("ok: sessa model")
    assert not run.exists()
