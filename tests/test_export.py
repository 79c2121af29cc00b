"""sessa-export / load_pretrained, and restoring a checkpoint onto other meshes.

One tiny run (Sessa, d_model 16, 1 layer + MLP, 2 steps) is trained on 8 fake CPU devices as
mesh (fsdp=4, tensor=2). One checker subprocess (8 devices) then:
- restores it with load_model onto (fsdp=2, tensor=4) and onto one device: same parameters;
- exports it (fp32, shards forced by a tiny --max-shard-size; and bf16, one file) and loads
  the export with load_pretrained on one device and on a mesh: bit-identical fp32 logits;
- checks the errors for a missing directory and missing / extra / misshaped tensors.
"""

import json
import os
import subprocess
import sys
import textwrap

import yaml

from conftest import xla_flags

CONFIG = {
    "model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2, "mlp_ratio": 2},
    "data": {"task": "symbol_soup", "seq_len": 16, "num_eval_examples": 8},
    "optimizer": {"lr": 1e-2, "warmup_steps": 1},
    "checkpoint": {"every_steps": 2, "keep_last": 2},
    "run": {"steps": 2, "global_batch_size": 8, "log_every": 1, "eval_every": 0,
            "tensorboard": False},
}


def env_for(devices: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


CHECK = textwrap.dedent(r'''
    import json, os, sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from sessa_jax.train import load_model, MeshConfig
    from sessa_jax.train.mesh import make_mesh
    from sessa_jax.export import ExportError, load_pretrained
    from sessa_jax.export.cli import main as export_main
    import sessa_jax

    run, out = sys.argv[1], sys.argv[2]
    assert len(jax.devices()) == 8

    def pdict(m):
        return {k: v for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}

    # -- resharding restore: saved on (fsdp=4, tensor=2) -> (fsdp=2, tensor=4) and 1 device
    mesh24 = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    m24, cfg, step = load_model(run, mesh=mesh24)
    m1, _, step1 = load_model(run)
    assert step == step1 == 2, (step, step1)
    p24, p1 = pdict(m24), pdict(m1)
    assert p24.keys() == p1.keys()
    for k in p1:
        a24, a1 = p24[k][...], p1[k][...]
        np.testing.assert_array_equal(np.asarray(a24), np.asarray(a1), err_msg=str(k))
        assert len(a1.sharding.device_set) == 1
    k_in = ("blocks", 0, "mlp", "gate", "kernel")  # (embed, mlp) -> (fsdp, tensor)
    sh = p24[k_in][...].sharding
    assert isinstance(sh, NamedSharding) and tuple(sh.spec) == ("fsdp", "tensor"), sh
    assert len(sh.device_set) == 8
    print("reshard ok")

    # -- export, fp32, forced into shards
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 16)))
    want = np.asarray(m1(tokens))
    d32 = os.path.join(out, "fp32")
    assert export_main(["--run", run, "--out", d32, "--max-shard-size", "4KB"]) == 0
    files = sorted(os.listdir(d32))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files, files
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)], shards
    assert not any(f.endswith((".pkl", ".pickle", ".msgpack")) for f in files)
    idx = json.load(open(os.path.join(d32, "model.safetensors.index.json")))
    assert "blocks.0.mixer.W_in.kernel" in idx["weight_map"], sorted(idx["weight_map"])[:5]
    conf = json.load(open(os.path.join(d32, "config.json")))
    assert conf["model"]["d_model"] == 16 and conf["step"] == 2

    got1 = sessa_jax.load_pretrained(d32)
    np.testing.assert_array_equal(np.asarray(got1(tokens)), want)
    got8 = load_pretrained(d32, mesh=mesh24)
    sh = got8.blocks[0].mlp.gate.kernel[...].sharding
    assert tuple(sh.spec) == ("fsdp", "tensor") and len(sh.device_set) == 8, sh
    np.testing.assert_allclose(np.asarray(got8(tokens)), want, rtol=1e-5, atol=1e-6)
    for k, v in pdict(got8).items():
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(p1[k][...]))
    print("export fp32 ok")

    # -- bf16, one file
    d16 = os.path.join(out, "bf16")
    assert export_main(["--run", run, "--out", d16, "--dtype", "bf16"]) == 0
    assert sorted(f for f in os.listdir(d16)) == ["config.json", "model.safetensors"]
    m16 = load_pretrained(d16)
    w = m16.blocks[0].mixer.W_in.kernel[...]
    assert w.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(
        np.asarray(w), np.asarray(m1.blocks[0].mixer.W_in.kernel[...].astype(jax.numpy.bfloat16)))
    assert np.isfinite(np.asarray(m16(tokens))).all()
    print("export bf16 ok")

    # -- errors
    def err(path):
        try:
            load_pretrained(path)
        except ExportError as e:
            return str(e)
        raise AssertionError("no error for " + path)

    assert "no such export directory" in err(os.path.join(out, "nope"))
    assert export_main(["--run", os.path.join(out, "nope"), "--out", os.path.join(out, "x")]) == 2
    from safetensors.numpy import load_file, save_file
    bad = os.path.join(out, "bad")
    assert export_main(["--run", run, "--out", bad]) == 0
    f = os.path.join(bad, "model.safetensors")
    t = load_file(f)
    t.pop("ln_f.scale"); t.pop("embed.embedding")
    t["blocks.0.mlp.up.kernel"] = np.zeros((3, 5), np.float32)
    t["blocks.7.extra"] = np.zeros((2,), np.float32)
    save_file(t, f)
    assert "sha256 does not match config.json" in err(bad)  # an edited file is caught first
    from sessa_jax.export.core import file_sha256
    conf = json.load(open(os.path.join(bad, "config.json")))
    conf["sha256"]["model.safetensors"] = file_sha256(f)  # as if exported that way
    json.dump(conf, open(os.path.join(bad, "config.json"), "w"))
    msg = err(bad)
    for part in ("missing (2): embed.embedding, ln_f.scale", "unexpected (1): blocks.7.extra",
                 "blocks.0.mlp.up.kernel: expected (16, 32), got (3, 5)"):
        assert part in msg, msg
    os.remove(os.path.join(d32, shards[0]))
    assert "missing" in err(d32) and shards[0] in err(d32)
    print("errors ok")
''')


def test_reshard_restore_and_export(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    run_dir = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "sessa_jax.train", "--config", str(cfg_path),
         f"run.output_dir={run_dir}", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
        env=env_for(8), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "fsdp=4 tensor=2" in p.stdout + p.stderr
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    p = subprocess.run([sys.executable, str(script), str(run_dir), str(tmp_path / "out")],
                       env=env_for(8), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    for s in ("reshard ok", "export fp32 ok", "export bf16 ok", "errors ok"):
        assert s in p.stdout, p.stdout + p.stderr


def test_import_is_lazy():
    code = ("import sys, sessa_jax; assert 'jax' not in sys.modules, 'jax imported'; "
            "f = sessa_jax.load_pretrained; assert callable(f)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
