"""scripts/aot_compile.py: the full sharded train step compiled ahead of time for TPU slices
(libtpu's topology API; no TPU needed). Runs in subprocesses: libtpu and the CPU backend are
kept apart from the test process. Fails (not skips) when libtpu is missing."""

import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
    "model": {"family": "sessa", "d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256},
    "data": {"task": "symbol_soup", "seq_len": 128},
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "run": {"steps": 10, "global_batch_size": 8},
}


def aot(tmp_path, topology, *overrides):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "XLA_FLAGS"))}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "aot_compile.py"),
                        "--config", str(cfg), "--topology", topology, *overrides],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    out = p.stdout + p.stderr
    assert "cannot get TPU topology" not in out, "libtpu missing or topology API failed:\n" + out
    return p.returncode, out


@pytest.mark.parametrize("topology,mesh", [("v5e:2x2", []),
                                           ("v5p:2x2x2", ["mesh.tensor=2"])])
def test_small_config_compiles(tmp_path, topology, mesh):
    code, out = aot(tmp_path, topology, *mesh)
    assert code == 0, out
    for s in ("arguments", "temporary", "outputs", "FLOPs per step", "at 40% MFU",
              "at 60% MFU", "fits:"):
        assert s in out, out
    if topology == "v5p:2x2x2":
        assert "8 x TPU v5" in out and "2 host(s)" in out and "fsdp=4 tensor=2" in out, out
    else:
        assert "of 16.000 GiB HBM" in out, out


def test_absurd_config_does_not_fit(tmp_path):
    # ~11B parameters in two layers (~43 GiB of weights and Adam state a chip): far over, and
    # two layers compile in a fraction of the time of sixteen
    code, out = aot(tmp_path, "v5e:2x2", "model.d_model=24576", "model.n_layers=2",
                    "model.n_heads=96")
    assert code == 1, out
    assert "does not fit: needs " in out and "chip has 16.00 GiB (" in out and "GiB over)" in out, out
