"""Whole training runs in subprocesses (fake CPU devices must be set before JAX starts).

One tiny config (Sessa, d_model 16, 1 layer, T 16, 12 steps) is run several ways and the
per-step losses in metrics.jsonl are compared with an uninterrupted 1-device run:

- 8 devices as mesh (data=2, fsdp=2, tensor=2), killed by SIGTERM mid-way, resumed on the
  same mesh and killed again, then resumed on 2 devices (fsdp=2) with another model.remat:
  same losses throughout;
- two processes joined by jax.distributed on CPU (one device each), SIGTERM to one of them:
  both save the same step and exit 143, and the restart finishes with the same losses;
- the newest checkpoint corrupted: load_model and sessa-eval warn and use the previous one.
Retention (last 2 + best by eval loss) is checked across the resumes, a persistent compilation
cache across the two 8-device sessions, and the reference run's profile trace and goodput.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import xla_flags

STEPS = 12
CONFIG = {
    "model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2},
    "data": {"task": "symbol_soup", "seq_len": 16, "num_eval_examples": 8},
    "optimizer": {"lr": 1e-2, "warmup_steps": 2},
    "checkpoint": {"every_steps": 4, "keep_last": 2, "keep_best_metric": "loss",
                   "keep_best_mode": "max"},  # 'best' = worst loss: an old step to keep
    "run": {"steps": STEPS, "global_batch_size": 8, "log_every": 1, "eval_every": 0,
            "tensorboard": False},
}
RTOL = 2e-4  # sharded reductions sum in another order


def env_for(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cmd(config: str, run_dir, *overrides) -> list:
    return [sys.executable, "-m", "sessa_jax.train", "--config", config,
            f"run.output_dir={run_dir}", *overrides]


def losses(run_dir) -> dict:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def last_step(run_dir) -> int:
    try:
        return max(losses(run_dir))
    except (FileNotFoundError, ValueError, json.JSONDecodeError):
        return 0


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_until_then_term(args, env, run_dir, past: int):
    """Start a run, send SIGTERM once metrics.jsonl shows a step > ``past``."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while last_step(run_dir) <= past and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be interrupted:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143, out  # interrupted (after saving), not finished
    assert "SIGTERM: saved checkpoint at step" in out, out
    assert "stopped by SIGTERM at step" in out and "final eval" not in out, out
    return out


def assert_same(got: dict, want: dict, steps):
    for s in steps:
        assert s in got, f"step {s} missing from {sorted(got)}"
        np.testing.assert_allclose(got[s], want[s], rtol=RTOL, err_msg=f"step {s}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    path = d / "tiny.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return str(path)


@pytest.fixture(scope="module")
def reference_run(config, tmp_path_factory):
    """The uninterrupted 1-device run (profiling steps 2..3 on the way) -> (run dir, stdout)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    p = subprocess.run(cmd(config, run_dir, "run.profile_steps=[1,3]"), env=env_for(1),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    return run_dir, p.stdout


@pytest.fixture(scope="module")
def reference(reference_run):
    got = losses(reference_run[0])
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def test_profile_trace_and_goodput_summary(reference_run):
    """run.profile_steps leaves a jax.profiler trace (TensorBoard's XPlane file and Perfetto's
    JSON) under the run directory; the summary's goodput buckets add up to the wall time."""
    run_dir, out = reference_run
    found = [os.path.join(d, f) for d, _, fs in os.walk(run_dir / "profile") for f in fs]
    assert any(f.endswith(".xplane.pb") for f in found), found
    assert any(f.endswith("perfetto_trace.json.gz") for f in found), found
    assert "profiling steps 2..3 into" in out
    g = json.loads((run_dir / "summary.json").read_text())["goodput"]
    parts = ["compile_sec", "setup_sec", "data_sec", "checkpoint_sec", "eval_sec",
             "profile_sec", "step_sec"]
    assert all(g[k] >= 0 for k in parts), g
    assert g["compile_sec"] > 0 and g["checkpoint_sec"] > 0 and g["profile_sec"] > 0, g
    assert sum(g[k] for k in parts) == pytest.approx(g["total_sec"], rel=1e-6), g
    assert g["mfu"] is None and "MFU n/a" in out  # a CPU has no known peak
    assert g["tokens_per_sec"] > 0 and 0 < g["goodput"] <= 1
    assert 0 < g["data_first_sec"] <= g["data_sec"], g  # the start-up wait, told apart
    # the first fetch had no step to overlap with; the device-idle part is inside data_sec
    assert g["data_first_sec"] <= g["data_stall_sec"] <= g["data_sec"], g


def test_goodput_counts_a_fetch_as_a_stall_only_when_the_device_is_idle():
    """Goodput.stall: host time fetching a batch while the last step still runs is overlapped
    with it, not a wait; a fetch that ends with that step done (or before any step) is."""
    from sessa_jax.train.metrics import Goodput

    class Step:  # stands in for a jax.Array output of the newest dispatched step
        def __init__(self, done):
            self.done = done

        def is_ready(self):
            return self.done

    g = Goodput()
    try:
        g.stall(0.5, None)  # before the first step: nothing could overlap
        g.stall(0.25, Step(done=False))  # the device was busy throughout
        g.stall(0.125, Step(done=True))  # the device ran out of work
        assert g.data_stall == pytest.approx(0.625)
        assert g.report(1, 1.0, None)["data_stall_sec"] == pytest.approx(0.625)
    finally:
        g.close()


def test_sigterm_resume_across_meshes_and_corrupt_checkpoint(config, reference, tmp_path):
    run_dir = tmp_path / "run"
    # every compile is cached (the default keeps only those of 1 s or more)
    slow = dict(SESSA_DEBUG_STEP_SLEEP=0.25, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
    # 1) 8 devices (2, 2, 2), with a persistent compilation cache; killed past the step-4
    # checkpoint.
    cache = tmp_path / "compile-cache"
    mesh8 = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"run.compilation_cache_dir={cache}"]
    run_until_then_term(cmd(config, run_dir, *mesh8), env_for(8, **slow), run_dir, past=4)
    assert any(name.startswith("jit_") for name in os.listdir(cache)), os.listdir(cache)
    first = last_step(run_dir)
    assert 5 <= first < STEPS
    assert_same(losses(run_dir), reference, range(1, first + 1))  # 8 devices == 1 device
    # 2) same mesh again, killed once more.
    out = run_until_then_term(cmd(config, run_dir, *mesh8), env_for(8, **slow), run_dir,
                              past=first)
    assert f"resumed from step {first}" in out
    hits = re.search(r"compilation cache: (\d+) hits", out)  # session 1 compiled these steps
    assert hits and int(hits.group(1)) > 0, out
    second = last_step(run_dir)
    # 3) another device count and mesh shape: 2 devices, fsdp=2; and another remat (execution
    # only: the parameters and losses are the same).
    p = subprocess.run(cmd(config, run_dir, "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=1",
                           "model.remat=full"),
                       env=env_for(2), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"resumed from step {second}" in p.stdout
    assert ("resuming with changed execution settings (the parameters are the same): "
            "model.remat 'none' -> 'full'") in p.stdout
    assert_same(losses(run_dir), reference, range(1, STEPS + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["final_eval"]["examples"] == 8

    # Retention across sessions: the last two saves plus the best evaluated one.
    ckpt = run_dir / "checkpoints"
    steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
    evals = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval/loss" in rec:
            evals[rec["step"]] = rec["eval/loss"]
    assert sorted(evals) == [4, 8, STEPS]  # saves of every_steps (and the last) are evaluated
    saved = sorted({4, 8, first, second, STEPS})
    assert steps == sorted(set(saved[-2:]) | {max(evals, key=evals.get)})
    assert summary["best_eval"]["step"] == max(evals, key=evals.get)

    # 4) Corrupt the newest checkpoint: readers warn and fall back to the previous one.
    assert steps[-1] == STEPS and len(steps) >= 2
    state_dir = ckpt / str(STEPS) / "state"
    for name in os.listdir(state_dir):
        path = state_dir / name
        if path.is_file():
            path.write_bytes(b"garbage")
    from sessa_jax.train import load_model

    with pytest.warns(RuntimeWarning, match=rf"checkpoint .*/{STEPS} is unreadable.*falling "
                                            rf"back to step {steps[-2]}"):
        model, cfg, step = load_model(str(run_dir))
    assert step == steps[-2] and cfg.model.d_model == 16
    assert model(np.zeros((1, 16), np.int32)).shape == (1, 16, cfg.model.vocab_size)

    # sessa-eval at another length falls back the same way and prints its metrics; it runs on
    # the mesh the run was trained on (8 devices here, enough for any of its meshes).
    p = subprocess.run([sys.executable, "-c", "import sys; from sessa_jax.train.cli import "
                        "eval_main; sys.exit(eval_main())", "--run", str(run_dir),
                        "data.seq_len=24"], env=env_for(8), capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "unreadable" in p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["step"] == steps[-2] and result["seq_len"] == 24 and result["examples"] == 8
    # the run's config is read from the newest readable metadata (step 12's, of session 3)
    assert result["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}, result


def test_two_processes_with_jax_distributed(config, reference, tmp_path):
    """Two processes joined by jax.distributed on CPU. SIGTERM reaches process 1 only: they agree
    on it at the next agreement step (run.stop_check_every=3, and every checkpoint step), both
    save that same step and exit 143; restarted, they resume from it and finish with the
    losses of the 1-process reference."""
    run_dir = tmp_path / "run"

    def start(**extra):
        port = free_port()
        return [subprocess.Popen(
            cmd(config, run_dir, "run.stop_check_every=3"), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
            env=env_for(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2,
                        JAX_PROCESS_ID=i, **extra)) for i in range(2)]

    procs = start(SESSA_DEBUG_STEP_SLEEP=0.25)
    deadline = time.time() + 240
    while last_step(run_dir) <= 4 and procs[0].poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert procs[0].poll() is None and procs[1].poll() is None, "ended before the signal"
    procs[1].send_signal(signal.SIGTERM)
    results = [finish(p) for p in procs]
    saved = []
    for i, (code, out) in enumerate(results):
        assert code == 143, out
        got = re.findall(rf"process {i}: SIGTERM: saved checkpoint at step (\d+)", out)
        assert len(got) == 1, out
        saved.append(int(got[0]))
    assert "process 1: SIGTERM received" in results[1][1]
    stop = saved[0]
    assert saved == [stop, stop] and 4 < stop < STEPS and (stop % 3 == 0 or stop % 4 == 0)
    assert "mesh data=2 fsdp=1 tensor=1 on 2 x cpu (2 processes)" in results[0][1]
    assert stop in {int(s) for s in os.listdir(run_dir / "checkpoints") if s.isdigit()}

    results = [finish(p) for p in start()]
    for code, out in results:
        assert code == 0, out
    assert f"resumed from step {stop}" in results[0][1]
    assert_same(losses(run_dir), reference, range(1, STEPS + 1))
    steps = sorted(int(s) for s in os.listdir(run_dir / "checkpoints") if s.isdigit())
    assert STEPS in steps and len(steps) <= 3


def test_bench_multi_gpu_smoke_on_fake_cpu_devices(tmp_path):
    """scripts/bench_multi_gpu.py end to end on 1 and 2 fake CPU devices (strong scaling):
    both runs train, and the report has a positive throughput for each."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "mg.json"
    env = env_for(1)
    env["XLA_FLAGS"] = xla_flags()  # the script adds its device counts
    p = subprocess.run(
        [sys.executable, os.path.join(root, "scripts", "bench_multi_gpu.py"), "--platform", "cpu",
         "--config", os.path.join(root, "configs", "gpu", "sessa-125m-2gpu.yaml"),
         "--devices", "1,2", "--modes", "strong", "--steps", "6", "--log-every", "2",
         "--out", str(out), "model.family=sessa", "model.vocab_size=80", "model.d_model=16",
         "model.n_layers=1", "model.n_heads=2", "data.seq_len=32", "data.mqar.num_pairs=4",
         "data.mqar.key_vocab=32", "data.mqar.value_vocab=32", "run.global_batch_size=4",
         "run.compute_dtype=float32"],
        env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rep = json.loads(out.read_text())
    assert [(r["devices"], r["global_batch"]) for r in rep["results"]] == [(1, 4), (2, 4)]
    assert all(r["tokens_per_sec"] > 0 and r["windows"] >= 1 for r in rep["results"])
