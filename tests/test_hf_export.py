"""Hugging Face / PyTorch export: parity, generation, import back, errors, whole-model interop.

Tiny random models (d_model 32, 2 layers). Parameters are perturbed away from their init
(LayerNorm scale 1 / bias 0, gamma_bias 1) so every tensor's mapping matters. Needs torch and
transformers (the ``hf`` extra, installed by .ci/run); without them these tests fail with a
message, unless SESSA_SKIP_HF_TESTS=1 asks to skip them.
"""

import contextlib
import io
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sessa_jax.export import ExportError
from sessa_jax.export.core import flatten_params
from sessa_jax.export.hf import export_hf, read_hf
from sessa_jax.models.config import ModelConfig
from sessa_jax.models.lm import DecoderLM

from conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULES_CACHE = tempfile.mkdtemp(prefix="sessa-hf-modules-")


def _hf():
    """(torch, AutoModelForCausalLM); a failure, not a silent skip, when they are missing."""
    # Local directories only: never ask the Hub; keep the copied model code out of ~/.cache.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_MODULES_CACHE", _MODULES_CACHE)
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        if os.environ.get("SESSA_SKIP_HF_TESTS") == "1":
            pytest.skip(f"SESSA_SKIP_HF_TESTS=1 and {e}")
        raise AssertionError(f"these tests need the hf extra ({e}): pip install torch==2.13.0 "
                             '&& pip install -e ".[test,hf]", or set SESSA_SKIP_HF_TESTS=1') from e
    torch.set_num_threads(1)
    return torch, AutoModelForCausalLM


def random_model(seed=0, **kw):
    """A DecoderLM with every parameter moved off its init -> (model, params pure dict)."""
    base = dict(vocab_size=50, d_model=32, n_layers=2, feedback_impl="chunked", chunk_size=8)
    base.update(kw)
    cfg = ModelConfig(**base)
    model = DecoderLM(cfg, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(seed + 1)
    params = jax.tree.map(
        lambda a: a + (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), params)
    nnx.update(model, params)
    return model, params


def flat_np(params):
    return {k: np.asarray(v) for k, v in flatten_params(params).items()}


PARITY = {
    "sessa-gqa-untied-mlp": dict(family="sessa", n_heads=4, n_kv_heads=2, tie_embeddings=False,
                                 mlp_ratio=2),
    "sessa-1head-tied": dict(family="sessa", n_heads=1, tie_embeddings=True),
    "transformer-gqa-tied-mlp": dict(family="transformer", n_heads=4, n_kv_heads=2,
                                     tie_embeddings=True, mlp_ratio=1.5),
    "transformer-untied-norope": dict(family="transformer", n_heads=2, tie_embeddings=False,
                                      use_rope=False),
    "mamba-untied": dict(family="mamba", tie_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(PARITY))
def test_logits_parity(name, tmp_path):
    torch, Auto = _hf()
    model, params = random_model(**PARITY[name])
    export_hf(params, model.cfg, str(tmp_path))
    conf = json.load(open(tmp_path / "config.json"))
    assert conf["model_type"] == "sessa_jax" and conf["architectures"] == ["SessaForCausalLM"]
    assert conf["auto_map"]["AutoModelForCausalLM"] == "modeling_sessa.SessaForCausalLM"
    tokens = np.random.default_rng(2).integers(0, 50, (2, 21))
    want = np.asarray(model(jnp.asarray(tokens)))
    hm = Auto.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert hm.dtype == torch.float32
    with torch.no_grad():
        got = hm(torch.tensor(tokens)).logits.numpy()
    err = rel_err(got, want)
    print(f"{name}: logits relative error {err:.2e}")
    assert err < 1e-4, err
    assert (hm.lm_head is None) == model.cfg.tie_embeddings


def test_names_layout_and_sharding(tmp_path):
    from safetensors import safe_open

    model, params = random_model(family="sessa", n_heads=4, n_kv_heads=2, tie_embeddings=False,
                                 mlp_ratio=2)
    s = export_hf(params, model.cfg, str(tmp_path), max_shard_size="8KB")
    files = sorted(os.listdir(tmp_path))
    assert len(s["files"]) > 1 and "model.safetensors.index.json" in files, files
    assert {"configuration_sessa.py", "modeling_sessa.py", "config.json"} <= set(files)
    idx = json.load(open(tmp_path / "model.safetensors.index.json"))
    wm = idx["weight_map"]
    for n in ("model.embed_tokens.weight", "model.layers.0.mixer.q_proj.weight",
              "model.layers.1.W_in.bias", "model.layers.0.mixer.gamma_bias",
              "model.layers.0.mlp.gate_proj.weight", "model.norm.weight", "lm_head.weight"):
        assert n in wm, n
    with safe_open(str(tmp_path / wm["model.layers.0.mixer.k_proj.weight"]), "numpy") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["sessa_jax"] == "sessa_jax.hf.v1"
        k = f.get_tensor("model.layers.0.mixer.k_proj.weight")
    jk = np.asarray(params["blocks"][0]["mixer"]["mixer"]["k_proj"]["kernel"])  # (in, out)
    assert k.shape == (16, 32) and np.array_equal(k, jk.T)  # PyTorch (out, in)


def test_generate_matches_jax_and_script(tmp_path):
    """HF greedy generate() == sessa_jax.generate greedy == scripts/generate.py --greedy
    (the script reads a run directory: made here by sessa-import of the export)."""
    torch, Auto = _hf()
    from sessa_jax.export.importer import import_hf
    from sessa_jax.generate import generate

    model, params = random_model(family="sessa", vocab_size=259, n_heads=4, n_kv_heads=2,
                                 tie_embeddings=False, mlp_ratio=1)
    hf_dir, run = str(tmp_path / "hf"), str(tmp_path / "run")
    export_hf(params, model.cfg, hf_dir)
    hm = Auto.from_pretrained(hf_dir, trust_remote_code=True)
    prompt = [1] + [b + 3 for b in "hi".encode()]  # the script's byte layout: [bos] + bytes
    n_new = 8
    with torch.no_grad():
        hf_new = hm.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    hf_new = hf_new[0, len(prompt):].tolist()
    out = generate(model, jnp.asarray([prompt]), jnp.asarray([len(prompt)]),
                   max_new_tokens=n_new, greedy=True)
    assert np.asarray(out["tokens"])[0].tolist() == hf_new

    import_hf(hf_dir, run)
    spec = importlib.util.spec_from_file_location("gen_script", os.path.join(ROOT, "scripts",
                                                                             "generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        mod.main(["--checkpoint", run, "--prompt-ids", ",".join(map(str, prompt)), "--greedy",
                  "--ids", "--ignore-eos",
                  "--max-new-tokens", str(n_new)])
    line = buf.getvalue().split("generated ids: ")[1].splitlines()[0]
    ids = [int(x) for x in line.split(",")]
    assert ids == hf_new, (ids, hf_new)


def test_export_import_round_trip_and_continue(tmp_path):
    """export -> sessa-import -> identical params; the run continues with sessa-train; a
    sessa-export --format hf of that run gives the same tensors back; a save_pretrained
    checkpoint without our config block imports to the same parameters."""
    torch, Auto = _hf()
    from safetensors.numpy import load_file

    from sessa_jax.export.cli import main as export_main
    from sessa_jax.export.importer import main as import_main
    from sessa_jax.train import load_model

    model, params = random_model(family="sessa", n_heads=2, tie_embeddings=True, mlp_ratio=1,
                                 feedback_impl="dense")
    hf_dir, run = str(tmp_path / "hf"), str(tmp_path / "run")
    export_hf(params, model.cfg, hf_dir)

    cfg, back, _ = read_hf(hf_dir)
    assert cfg == model.cfg
    a, b = flat_np(params), flat_np(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(
        "data: {task: symbol_soup, seq_len: 16, num_eval_examples: 8}\n"
        "checkpoint: {every_steps: 1, keep_last: 3}\n"
        "run: {steps: 1, global_batch_size: 4, log_every: 1, eval_every: 0, tensorboard: false}\n")
    assert import_main(["--hf", hf_dir, "--out", run, "--config", str(train_yaml)]) == 0
    m0, tcfg, step = load_model(run)
    assert step == 0 and tcfg.model == model.cfg
    c = flat_np(nnx.to_pure_dict(nnx.state(m0, nnx.Param)))
    assert all(np.array_equal(a[k], c[k]) for k in a)

    out2 = str(tmp_path / "hf2")
    assert export_main(["--run", run, "--step", "0", "--format", "hf", "--out", out2]) == 0
    t1, t2 = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(
        os.path.join(out2, "model.safetensors"))
    assert t1.keys() == t2.keys() and all(np.array_equal(t1[k], t2[k]) for k in t1)
    assert json.load(open(os.path.join(out2, "config.json")))["sessa_jax"]["step"] == 0

    # a checkpoint written by transformers itself, config without our "sessa_jax" block
    hm = Auto.from_pretrained(hf_dir, trust_remote_code=True)
    third = str(tmp_path / "third")
    hm.save_pretrained(third)
    conf = json.load(open(os.path.join(third, "config.json")))
    conf.pop("sessa_jax")
    json.dump(conf, open(os.path.join(third, "config.json"), "w"))
    cfg3, p3, _ = read_hf(third)
    assert (cfg3.family, cfg3.d_model, cfg3.n_heads, cfg3.mlp_hidden, cfg3.tie_embeddings) == (
        "sessa", 32, 2, 32, True)
    d = flat_np(p3)
    assert all(np.array_equal(a[k], d[k]) for k in a)

    # sessa-train continues the imported run (resumes from its step-0 checkpoint)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "sessa_jax.train", "--config",
                        os.path.join(run, "config.yaml")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "resumed from step 0" in p.stdout, p.stdout
    _, _, step = load_model(run)
    assert step == 1


def test_bad_checkpoints_list_every_problem(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from sessa_jax.export.importer import main as import_main

    model, params = random_model(family="transformer", n_heads=4, n_kv_heads=2,
                                 tie_embeddings=False)
    good = str(tmp_path / "good")
    export_hf(params, model.cfg, good)

    bad = str(tmp_path / "bad")
    export_hf(params, model.cfg, bad)
    f = os.path.join(bad, "model.safetensors")
    t = load_file(f)
    t.pop("model.norm.weight")
    t.pop("model.layers.1.self_attn.k_proj.bias")
    t["model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 5), np.float32)
    t["model.layers.9.extra.weight"] = np.zeros((2,), np.float32)
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ExportError) as e:
        read_hf(bad)
    msg = str(e.value)
    for part in ("missing (2): model.layers.1.self_attn.k_proj.bias, model.norm.weight",
                 "unexpected (1): model.layers.9.extra.weight",
                 "model.layers.0.self_attn.q_proj.weight: expected (32, 32), got (3, 5)"):
        assert part in msg, msg
    assert import_main(["--hf", bad, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sessa-import: error:") and "missing (2)" in err
    assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "r")

    # a partial sharded checkpoint: one shard file gone
    part = str(tmp_path / "part")
    s = export_hf(params, model.cfg, part, max_shard_size="4KB")
    os.remove(os.path.join(part, s["files"][1]))
    with pytest.raises(ExportError, match=s["files"][1]):
        read_hf(part)
    # a truncated (corrupted) file
    trunc = str(tmp_path / "trunc")
    export_hf(params, model.cfg, trunc)
    f = os.path.join(trunc, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(ExportError, match="model.safetensors"):
        read_hf(trunc)
    # non-finite values
    nan = str(tmp_path / "nan")
    export_hf(params, model.cfg, nan)
    f = os.path.join(nan, "model.safetensors")
    t = load_file(f)
    t["model.layers.1.self_attn.v_proj.bias"][3] = np.nan
    save_file(t, f, metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"non-finite .* model.layers.1.self_attn.v_proj.bias"):
        read_hf(nan)
    # not this architecture
    conf = json.load(open(os.path.join(good, "config.json")))
    conf["model_type"] = "llama"
    json.dump(conf, open(os.path.join(trunc, "config.json"), "w"))
    with pytest.raises(ExportError, match="model_type='llama'"):
        read_hf(trunc)
    # an architecture override that no longer fits the tensors
    assert import_main(["--hf", good, "--out", str(tmp_path / "r2"), "model.n_layers=3"]) == 2
    assert "missing: blocks.2" in capsys.readouterr().err


def test_export_without_the_extra_writes_files_and_says_so(tmp_path):
    """With torch/transformers not importable, --format hf still writes everything."""
    model, params = random_model(family="sessa", n_heads=2)
    src = str(tmp_path / "src")
    export_hf(params, model.cfg, src)
    from sessa_jax.export.importer import import_hf

    run = str(tmp_path / "run")
    import_hf(src, run)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from sessa_jax.export.cli import main\n"
            f"sys.exit(main(['--run', {run!r}, '--format', 'hf', '--out', {str(tmp_path / 'o')!r}]))")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'sessa_jax[hf]' in p.stderr, p.stderr
    files = set(os.listdir(tmp_path / "o"))
    assert {"config.json", "model.safetensors", "modeling_sessa.py",
            "configuration_sessa.py"} <= files, files


def test_text_run_exports_its_tokenizer(tmp_path):
    from sessa_jax.export.hf import _tokenizer_files

    info = _tokenizer_files("bytes", str(tmp_path))
    assert (info["pad_id"], info["bos_id"], info["eos_id"], info["vocab_size"]) == (0, 1, 2, 259)
    assert json.load(open(tmp_path / "sessa_tokenizer.json"))["offset"] == 3
    model, params = random_model(family="sessa", n_heads=2, vocab_size=259)
    export_hf(params, model.cfg, str(tmp_path / "x"), tokenizer="bytes")
    conf = json.load(open(tmp_path / "x" / "config.json"))
    assert (conf["pad_token_id"], conf["bos_token_id"], conf["eos_token_id"]) == (0, 1, 2)
    assert os.path.isfile(tmp_path / "x" / "sessa_tokenizer.json")

    _hf()
    from transformers import AutoTokenizer

    from sessa_jax.data.tokenizer import ByteTokenizer

    # trust_remote_code: AutoTokenizer reads config.json, whose auto_map names our code
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "x"), trust_remote_code=True)
    text = "hi ü\n\x00  end"
    ids = tok(text)["input_ids"]
    assert ids == [1] + ByteTokenizer().encode(text).tolist()  # [bos] + bytes, as generate.py
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    # a re-export of a run without a tokenizer removes the old tokenizer files
    export_hf(params, model.cfg, str(tmp_path / "x"))
    assert not {"tokenizer.json", "sessa_tokenizer.json"} & set(os.listdir(tmp_path / "x"))


def test_whole_model_author_naming():
    from sessa_jax.interop import layer_to_reference, model_from_reference, model_to_reference

    model, params = random_model(family="sessa", n_heads=4, n_kv_heads=2, tie_embeddings=False,
                                 mlp_ratio=1, feedback_impl="dense")
    state = model_to_reference(model)
    for n in ("embedding.weight", "layers.0.ln.weight", "layers.1.mixer.proj_fb.weight",
              "layers.1.mixer.gamma_bias", "layers.0.mlp.down_proj.weight", "norm.bias",
              "lm_head.weight"):
        assert n in state, n
    one = layer_to_reference(model.blocks[1].mixer)  # the single-layer mapping, unchanged
    for k, v in one.items():
        assert np.array_equal(state[f"layers.1.{k}"], v), k
    back = model_from_reference(state, model.cfg)
    a, b = flat_np(params), flat_np(nnx.to_pure_dict(nnx.state(back, nnx.Param)))
    assert all(np.array_equal(a[k], b[k]) for k in a)

    broken = dict(state)
    broken.pop("layers.0.W_out.bias")
    broken["layers.0.mixer.k_proj.weight"] = np.zeros((4, 4), np.float32)
    broken["head.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError) as e:
        model_from_reference(broken, model.cfg)
    msg = str(e.value)
    assert "missing (1): layers.0.W_out.bias" in msg and "unexpected (1): head.weight" in msg
    assert "layers.0.mixer.k_proj.weight: expected (16, 32), got (4, 4)" in msg
    with pytest.raises(ValueError, match="Sessa stacks only"):
        model_to_reference(DecoderLM(ModelConfig(family="transformer", vocab_size=50,
                                                 d_model=32, n_layers=1), rngs=nnx.Rngs(0)))
