"""Checkpoint and export integrity, in one process, without training (states are saved directly).

A run directory gets checkpoints at steps 1 and 2 (different parameters) and step 3 with a NaN
parameter. Then, on copies of it:
- each corruption kind of step 2 (flipped bits, random bytes, truncation, a deleted file, garbled
  or edited metadata) makes load_model and a resume warn once, naming step 2, and fall back to
  step 1 with step 1's exact parameters; asking for step 2 explicitly raises CheckpointError;
- a randomized trial of corruptions never restores different values silently (the figures for
  the README's reliability section);
- the NaN step is refused by load_model, sessa-eval (exit 4) and sessa-export (exit 4), and
  skipped by a resume;
- exports are mode 0644 and load_pretrained refuses a damaged file or NaN tensors.
"""

import json
import os
import random
import re
import shutil
import stat

import jax
import numpy as np
import pytest

from sessa_jax.train.checkpoint import CheckpointError, Checkpointer, load_model
from sessa_jax.train.config import from_dict
from sessa_jax.train.mesh import make_mesh
from sessa_jax.train.state import abstract_with_shardings, init_state, make_setup

RAW = {
    "model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2},
    "data": {"task": "symbol_soup", "seq_len": 16, "num_eval_examples": 8},
    "checkpoint": {"every_steps": 1, "keep_last": 5, "async_save": False},
    "mesh": {"data": 1},
    "run": {"steps": 3, "global_batch_size": 8, "tensorboard": False},
}
N_TRIAL = 36


def host(tree):
    return jax.tree.map(lambda x: np.array(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, cfg, setup, {step: host params})."""
    d = tmp_path_factory.mktemp("integrity") / "run"
    cfg = from_dict({**RAW, "run": {**RAW["run"], "output_dir": str(d)}})
    setup = make_setup(cfg, make_mesh(cfg.mesh))
    state = init_state(setup)
    ck = Checkpointer(str(d), cfg.checkpoint)
    params = {}
    for step in (1, 2, 3):
        p = host(state.params)
        p["embed"]["embedding"] += step  # distinct parameters per step
        if step == 3:
            p["embed"]["embedding"][0, 0] = np.nan
        s = state.replace(params=jax.device_put(p, setup.shardings.params),
                          step=jax.numpy.int32(step))
        ck.save(step, s, cfg)
        params[step] = p
    ck.wait()
    ck.close()
    return str(d), cfg, setup, params


def copy_without(run_dir, tmp_path, drop=(3,)):
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst)
    for s in drop:
        shutil.rmtree(dst / "checkpoints" / str(s))
    return dst


def data_files(step_dir):
    """Array data files of a step's state (OCDBT), largest first."""
    out = []
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            out += [os.path.join(root, f) for f in files]
    return sorted(out, key=os.path.getsize, reverse=True)


def corrupt(kind: str, step_dir: str, rng: random.Random) -> None:
    if kind.startswith("meta"):
        path = os.path.join(step_dir, "meta", "metadata")
    else:
        files = data_files(step_dir)
        if kind in ("flip4", "truncate"):
            # The largest file holds the parameters, which every restore reads. OCDBT names are
            # random, so files of equal size come in any order: damage every one of them.
            top = [f for f in files if os.path.getsize(f) == os.path.getsize(files[0])]
            if len(top) > 1:
                for f in top:
                    corrupt_file(kind, f, rng)
                return
        path = files[0] if kind in ("flip4", "truncate") else rng.choice(files)
    corrupt_file(kind, path, rng)


def corrupt_file(kind: str, path: str, rng: random.Random) -> None:
    if kind == "delete":
        os.remove(path)
        return
    data = bytearray(open(path, "rb").read())
    if kind == "flip4":  # four bit flips in the parameters' data
        for _ in range(4):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "random400":
        o = rng.randrange(max(1, len(data) - 400))
        data[o:o + 400] = bytes(rng.randrange(256) for _ in range(400))
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "meta_garbage":
        data[len(data) // 2:] = b"\x00garbage"
    elif kind == "meta_edit":  # valid JSON, one config value changed
        meta = json.loads(data)
        meta["config"]["optimizer"]["lr"] *= 10
        data = json.dumps(meta).encode()
    open(path, "wb").write(bytes(data))


def params_equal(a, b) -> bool:
    return all(np.array_equal(x, y, equal_nan=True)
               for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(b)))


# The metadata kinds always damage what a restore reads. Bit flips and truncation of the largest
# data file (the parameters) almost always do, but OCDBT files can hold bytes that no read
# touches: then the restore must give step 2's exact values (never different ones).
@pytest.mark.parametrize("kind", ["flip4", "truncate", "meta_garbage", "meta_edit"])
def test_each_corruption_falls_back_to_the_previous_step(run, tmp_path, kind):
    import warnings

    from flax import nnx

    run_dir, cfg, setup, params = run
    d = copy_without(run_dir, tmp_path)
    corrupt(kind, str(d / "checkpoints" / "2"), random.Random(kind))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always", RuntimeWarning)
        model, _, step = load_model(str(d))
    rec = [w for w in rec if issubclass(w.category, RuntimeWarning)]
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if not rec and kind in ("flip4", "truncate"):  # landed in unread bytes: harmless
        assert step == 2 and params_equal(got, params[2])
        return
    assert len(rec) == 1 and step == 1, [str(w.message) for w in rec]
    assert re.search(r"checkpoint .*/2 is unreadable \(.+\); falling back to step 1",
                     str(rec[0].message)), rec[0].message
    assert params_equal(got, params[1])
    with pytest.raises(CheckpointError, match=r"/2: checkpoint is unreadable"):
        Checkpointer(str(d), read_only=True).restore_params(
            setup.abstract.params, step=2)
    # A resume falls back the same way and moves the damaged step aside.
    with pytest.warns(RuntimeWarning, match=r"/2 is unreadable"):
        state, _, step = Checkpointer(str(d), cfg.checkpoint).restore(
            abstract_with_shardings(setup))
    assert step == 1 and params_equal(state.params, params[1])
    assert os.listdir(d / "corrupt_checkpoints") and not (d / "checkpoints" / "2").exists()


def test_a_value_that_differs_from_its_digest_is_named(run, tmp_path):
    """Data that still decodes but differs from what was saved (what bit flips inside array
    bytes give) fails the recorded digest, and the warning names the array. Made exact here by
    changing one recorded digest and resealing the metadata's own sha256."""
    from sessa_jax.train.checkpoint import _meta_digest

    run_dir, cfg, setup, params = run
    d = copy_without(run_dir, tmp_path)
    path = d / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    arrays = meta["checksums"]["arrays"]
    name = sorted(k for k in arrays if k.startswith("params."))[0]
    arrays[name] = "0" * len(str(arrays[name]))
    meta["meta_sha256"] = _meta_digest(meta)
    path.write_text(json.dumps(meta))
    with pytest.warns(RuntimeWarning, match=r"does not match its checksum") as rec:
        _, _, step = load_model(str(d))
    assert step == 1 and f"array {name}" in str(rec[0].message), rec[0].message


def test_export_reads_parameters_into_host_memory_and_verifies_them_there(run, tmp_path,
                                                                          monkeypatch):
    """load_params_host (sessa-export's reader): NumPy arrays, no device transfer or jit, the
    same bits as saved; a digest mismatch is still named and falls back."""
    from sessa_jax.train.checkpoint import _meta_digest, load_params_host

    run_dir, cfg, setup, params = run
    d = copy_without(run_dir, tmp_path)
    path = d / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    name = sorted(k for k in meta["checksums"]["arrays"] if k.startswith("params."))[-1]
    meta["checksums"]["arrays"][name] = "0" * 16
    meta["meta_sha256"] = _meta_digest(meta)
    path.write_text(json.dumps(meta))

    def no_device(*a, **k):
        raise AssertionError("the parameters went to a device")

    monkeypatch.setattr(jax, "device_put", no_device)
    monkeypatch.setattr(jax, "jit", no_device)
    got, _, step = load_params_host(run_dir, step=2)
    assert step == 2 and all(type(x) is np.ndarray for x in jax.tree.leaves(got))
    assert params_equal(got, params[2])
    with pytest.warns(RuntimeWarning, match=rf"array {name} does not match its checksum"):
        got, _, step = load_params_host(str(d))
    assert step == 1 and params_equal(got, params[1])


def test_eval_uses_the_training_mesh_or_says_why_not(run, tmp_path, capsys):
    """A checkpoint trained on (fsdp=2) evaluated on one device: data-parallel, with a line."""
    from sessa_jax.train.checkpoint import _meta_digest
    from sessa_jax.train.loop import evaluate_checkpoint

    run_dir, cfg, setup, params = run
    d = copy_without(run_dir, tmp_path)
    path = d / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["config"]["mesh"].update(data=1, fsdp=2, tensor=1)
    meta["meta_sha256"] = _meta_digest(meta)
    path.write_text(json.dumps(meta))
    got = evaluate_checkpoint(str(d), step=1)  # trained on this single device: kept
    assert got["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1} and not capsys.readouterr().err
    got = evaluate_checkpoint(str(d), step=2)
    err = capsys.readouterr().err
    assert "the training mesh does not fit here (mesh.data=1 x mesh.fsdp=2 x mesh.tensor=1 " \
           "needs 2 devices" in err and "evaluating data-parallel over 1 device" in err, err
    assert got["step"] == 2 and got["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}


def test_random_corruptions_are_detected_or_harmless(run, tmp_path):
    """N_TRIAL random corruptions of step 2 (kind, file and offset at random): each either falls
    back to step 1 or restores step 2's exact values. None restores different values.
    Figures of one run (README, Reliability): printed as 'corruption trial: {...}'."""
    run_dir, cfg, setup, params = run
    rng = random.Random(0)
    tally = {}
    for i in range(N_TRIAL):
        kind = ["flip4", "random400", "truncate", "delete", "meta_garbage", "meta_edit"][i % 6]
        d = copy_without(run_dir, tmp_path / str(i))
        corrupt(kind, str(d / "checkpoints" / "2"), rng)
        with _record() as rec:
            state, _, step = Checkpointer(str(d), cfg.checkpoint).restore(
                abstract_with_shardings(setup))
        if step == 1:
            assert params_equal(state.params, params[1]) and len(rec) == 1
            outcome = "detected"
        else:
            assert step == 2 and params_equal(state.params, params[2]), kind  # never silent
            outcome = "harmless"
        tally.setdefault(kind, {"detected": 0, "harmless": 0})[outcome] += 1
        shutil.rmtree(tmp_path / str(i))
    print("corruption trial:", json.dumps(tally))
    detected = sum(t["detected"] for t in tally.values())
    assert detected >= N_TRIAL // 2, tally
    # Metadata damage is always caught (its sha256); data-file damage may only touch bytes no
    # array uses (OCDBT files keep superseded nodes), and then the values are exactly step 2's.
    for kind in ("meta_garbage", "meta_edit"):
        assert tally[kind]["harmless"] == 0, tally


class _record:
    """warnings.catch_warnings(record=True) with every warning kept."""

    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings(record=True)
        rec = self._cm.__enter__()
        warnings.simplefilter("always")
        return rec

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_non_finite_weights_are_refused(run, tmp_path, capsys):
    run_dir, cfg, setup, params = run
    with pytest.raises(CheckpointError, match=r"/3: array params.embed.embedding holds 1 "
                                              r"non-finite values \(NaN/inf\); refusing"):
        load_model(run_dir)
    from sessa_jax.export.cli import main as export_main
    from sessa_jax.train.cli import eval_main
    assert eval_main(["--run", run_dir]) == 4
    err = capsys.readouterr().err
    assert "non-finite" in err and err.count("\n") == 1
    assert export_main(["--run", run_dir, "--out", str(tmp_path / "x")]) == 4
    assert "non-finite" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # A resume skips it (a NaN state cannot train) and takes step 2.
    d = copy_without(run_dir, tmp_path, drop=())
    with pytest.warns(RuntimeWarning, match=r"/3 is unreadable \(array params.embed.embedding "
                                            r"holds 1 non-finite values"):
        state, _, step = Checkpointer(str(d), cfg.checkpoint).restore(
            abstract_with_shardings(setup))
    assert step == 2 and params_equal(state.params, params[2])


def test_exports_are_readable_by_others_and_verified(run, tmp_path, capsys):
    run_dir, cfg, setup, params = run
    from sessa_jax.export import ExportError, load_pretrained
    from sessa_jax.export.cli import main as export_main

    out = tmp_path / "exp"
    assert export_main(["--run", run_dir, "--step", "2", "--out", str(out),
                        "--max-shard-size", "1KB"]) == 0
    files = sorted(os.listdir(out))
    assert len(files) > 3
    for f in files:
        assert stat.S_IMODE(os.stat(out / f).st_mode) == 0o644, f
    load_pretrained(str(out))  # loads clean
    shard = out / next(f for f in files if f.endswith(".safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # last bytes: tensor data, not the header
    shard.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"sha256 does not match config.json"):
        load_pretrained(str(out))
    # NaN tensors whose checksums were updated (a model that really holds NaN) are refused too.
    from safetensors.numpy import load_file, save_file
    from sessa_jax.export.core import file_sha256
    t = load_file(str(shard))
    name = next(iter(t))
    t[name] = t[name].copy()
    t[name].flat[0] = np.nan
    save_file(t, str(shard), metadata={"format": "sessa_jax.export.v1"})
    cfgj = json.loads((out / "config.json").read_text())
    cfgj["sha256"][shard.name] = file_sha256(str(shard))
    (out / "config.json").write_text(json.dumps(cfgj))
    with pytest.raises(ExportError, match=rf"tensor {name} holds 1 non-finite values"):
        load_pretrained(str(out))
