"""Training configs and CLI errors: loading, overrides, messages that name the key (no compiles)."""

import pytest
import yaml

from sessa_jax.train import cli
from sessa_jax.train.config import (
    ConfigError, TrainConfig, check_resume_compatible, from_dict, load_config, save_config,
)
from sessa_jax.train.metrics import flops_per_token, peak_flops

TINY = {
    "model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2},
    "data": {"task": "symbol_soup", "seq_len": 16, "num_eval_examples": 8},
    "run": {"steps": 2, "global_batch_size": 4},
}


def write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def error_of(raw=None, path=None, overrides=()):
    with pytest.raises(ConfigError) as e:
        if path is not None or overrides:
            load_config(path, overrides)
        else:
            from_dict(raw)
    return str(e.value)


def test_defaults_overrides_and_round_trip(tmp_path):
    path = write(tmp_path, TINY)
    cfg = load_config(path, ["optimizer.lr=1e-3", "run.steps=1e3", "data.mqar.num_pairs=4",
                             "run.compute_dtype=bfloat16", f"run.output_dir={tmp_path}/r"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.optimizer.lr == pytest.approx(1e-3)  # '1e-3' is a YAML string: still a float
    assert cfg.run.steps == 1000 and cfg.data.mqar.num_pairs == 4
    assert cfg.model.vocab_size == 44  # omitted: taken from the task
    assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"
    out = tmp_path / "resolved.yaml"
    save_config(cfg, str(out))
    assert load_config(str(out)) == cfg


def test_model_given_as_a_file(tmp_path):
    (tmp_path / "models").mkdir()
    write(tmp_path, {"family": "transformer", "d_model": 32, "n_layers": 2, "n_heads": 4,
                     "mlp_ratio": 2}, "models/m.yaml")
    cfg = load_config(write(tmp_path, {**TINY, "model": "models/m.yaml"}), ["model.n_layers=1"])
    assert (cfg.model.family, cfg.model.d_model, cfg.model.n_layers) == ("transformer", 32, 1)
    assert "model file 'nope.yaml' not found" in error_of(path=write(
        tmp_path, {**TINY, "model": "nope.yaml"}, "bad.yaml"))
    # a file plus execution knobs: the mapping's fields win over the file's
    cfg = load_config(write(tmp_path, {**TINY, "model": {"base": "models/m.yaml",
                                                        "n_layers": 3, "remat": "full"}}),
                      ["model.d_model=16"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.remat) == (16, 3, "full")
    assert "model.base: expected a model file path" in error_of(raw={**TINY, "model": {"base": 1}})


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lrr=1"], "unknown key 'optimizer.lrr' — did you mean 'optimizer.lr'?"),
    (["run.stepz=3"], "unknown key 'run.stepz' — did you mean 'run.steps'?"),
    (["run.steps=ten"], "run.steps: expected int, got 'ten'"),
    (["data.shuffle=maybe"], "data.shuffle: expected bool, got 'maybe'"),
    (["model.family=rnn"], "model.family: expected 'sessa' or 'transformer' or 'mamba'"),
    (["model.d_model=15"], "model.d_model=15 is not divisible by n_heads=2"),
    (["model.vocab_size=10"], "model.vocab_size=10 is smaller than the vocabulary"),
    (["run.global_batch_size=6", "optimizer.grad_accum_steps=4"],
     "run.global_batch_size=6 is not divisible by optimizer.grad_accum_steps=4"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one of mesh.data, mesh.fsdp, mesh.tensor"),
    (["mesh.rules.embd=null"],
     "unknown key 'mesh.rules.embd' — did you mean 'mesh.rules.embed'?"),
    (["data.symbol_soup.motif_prob=2"], "data.symbol_soup.motif_prob=2.0"),
    (["checkpoint.keep_best_metric=acc"], "checkpoint.keep_best_metric='acc'"),
    (["run.steps"], "expected key=value"),
])
def test_errors_name_the_key(tmp_path, overrides, message):
    assert message in error_of(path=write(tmp_path, TINY), overrides=overrides)


def test_resume_compatibility_names_the_field():
    a = from_dict(TINY)
    b = from_dict({**TINY, "data": {**TINY["data"], "seq_len": 32}})
    check_resume_compatible(a, from_dict({**TINY, "run": {**TINY["run"], "steps": 9}}))
    with pytest.raises(ConfigError, match=r"data.seq_len=32 differs"):
        check_resume_compatible(a, b)
    # execution settings may change (and are listed); parameter-changing fields may not
    def model(**kw):
        return from_dict({**TINY, "model": {**TINY["model"], **kw}})

    c = model(remat="full", chunk_size=8, loss_chunk_size=4)
    assert check_resume_compatible(a, c) == ["model.chunk_size 512 -> 8",
                                             "model.remat 'none' -> 'full'",
                                             "model.loss_chunk_size 0 -> 4"]
    for key, value in (("d_model", 32), ("param_dtype", "bfloat16"), ("mlp_ratio", 2)):
        with pytest.raises(ConfigError, match=rf"model.{key}=.* differs .*changes the param"):
            check_resume_compatible(a, model(**{key: value}))


def run_cli(main, argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys):
    path = write(tmp_path, TINY)
    out = f"run.output_dir={tmp_path}/run"
    cases = [
        ([path, "optimizer.lrr=1"], "did you mean 'optimizer.lr'?"),
        ([path, "mesh.data=4096"], "needs 4096 devices, but only "),
        ([str(tmp_path / "missing.yaml")], "missing.yaml' not found"),
    ]
    for argv, message in cases:
        code, err = run_cli(cli.train_main, ["--config", argv[0], *argv[1:], out], capsys)
        assert code == 2 and message in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    # Bad data files: the message names the file.
    bad = tmp_path / "empty.txt"
    bad.write_text("   \n")
    for paths, message in (([str(tmp_path / "nope.txt")], "nope.txt: file not found"),
                           ([str(bad)], "empty.txt: empty file")):
        code, err = run_cli(cli.train_main, [
            "--config", path, "data.task=text", f"data.text.paths={paths}", out], capsys)
        assert code == 3 and message in err, err  # data errors exit 3
    code, err = run_cli(cli.eval_main, ["--run", str(tmp_path / "no-run")], capsys)
    assert code == 4 and "no-run/checkpoints: no checkpoints directory" in err
    assert not (tmp_path / "run").exists()  # no failed call above created the run directory


def test_print_config(tmp_path, capsys):
    assert cli.train_main(["--config", write(tmp_path, TINY), "--print-config",
                           "run.steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"]["steps"] == 7 and printed["model"]["vocab_size"] == 44


def test_flops_and_peaks():
    cfg = from_dict(TINY).model
    f = flops_per_token(cfg, 16, n_params=1000)
    assert f == 6 * 1000 + 1 * 24 * 16 * 16  # 6N + Sessa's two attentions
    assert flops_per_token(cfg, 16) > 6 * 1000
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("TPU v5 lite") == 197e12 and peak_flops("TPU v5p") == 459e12
    assert peak_flops("cpu") is None


def test_mesh_and_batch_checks():
    from types import SimpleNamespace

    from sessa_jax.train.config import MeshConfig
    from sessa_jax.train.mesh import check_batch, mesh_shape

    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="needs 16 devices, but only 8 are available"):
        mesh_shape(MeshConfig(data=2, fsdp=4, tensor=2), 8)
    with pytest.raises(ConfigError, match="not divisible by the fixed axes' product 3"):
        mesh_shape(MeshConfig(data=-1, fsdp=3), 8)
    fake = SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})  # 4 batch shards
    check_batch(from_dict({**TINY, "run": {**TINY["run"], "global_batch_size": 8}}), fake)
    cfg = from_dict({**TINY, "run": {**TINY["run"], "global_batch_size": 6}})
    with pytest.raises(ConfigError, match=r"run.global_batch_size=6 is not divisible by "
                                          r"optimizer.grad_accum_steps=1 x 4 batch shards"):
        check_batch(cfg, fake)
