"""Paths as URIs: a ``gs://bucket/run`` is never rewritten into ``<cwd>/gs:/bucket/run``.

Offline: a fake ``gs`` backend for etils.epath maps ``gs://bucket/x`` onto a local directory,
so the real path code (config, run directory, metrics, config.yaml, exports, data listing and
preparation) writes "to GCS" and the test looks at what landed there. Orbax would reach GCS
through tensorstore, so the checkpoint manager is replaced by a recorder of the directory it
was given. Nothing may appear under the working directory.
"""

import json
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath

from sessa_jax.paths import PathError, append_text, is_local, user_path, write_text

RAW = {
    "model": {"family": "sessa", "d_model": 16, "n_layers": 1, "n_heads": 2},
    "data": {"task": "symbol_soup", "seq_len": 16, "num_eval_examples": 8},
    "mesh": {"data": 1},
    "run": {"steps": 2, "global_batch_size": 8, "tensorboard": False,
            "output_dir": "gs://bucket/run"},
}


class FakeGcs(epath_backend._OsPathBackend):  # noqa: SLF001 (epath's own test helper does so)
    """gs://bucket/key <-> <root>/bucket/key."""

    def __init__(self, root: str):
        self.root = root

    def _l(self, p) -> str:
        p = os.fspath(p)
        assert p.startswith("gs://"), p  # a gs path rewritten before it got here: the bug
        return os.path.join(self.root, p[len("gs://"):])

    def _g(self, p) -> str:
        return "gs://" + os.path.relpath(os.fspath(p), self.root)

    def open(self, path, mode):
        return super().open(self._l(path), mode)

    def exists(self, path):
        return super().exists(self._l(path))

    def isdir(self, path):
        return super().isdir(self._l(path))

    def listdir(self, path):
        return super().listdir(self._l(path))

    def glob(self, path):
        return [self._g(p) for p in super().glob(self._l(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self._l(top), top_down=top_down,
                                              on_error=on_error):
            yield self._g(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self._l(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return super().mkdir(self._l(path), exist_ok=exist_ok)

    def rmtree(self, path):
        return super().rmtree(self._l(path))

    def remove(self, path):
        return super().remove(self._l(path))

    def rename(self, path, dst):
        return super().rename(self._l(path), self._l(dst))

    def replace(self, path, dst):
        return super().replace(self._l(path), self._l(dst))

    def copy(self, path, dst, *, overwrite):
        src = self._l(path) if os.fspath(path).startswith("gs://") else path
        return super().copy(src, self._l(dst), overwrite=overwrite)

    def stat(self, path):
        return super().stat(self._l(path))


@pytest.fixture
def gcs(tmp_path, monkeypatch):
    """-> the local root behind gs://; the test runs in an empty working directory."""
    root = tmp_path / "gcs-root"
    (root / "bucket").mkdir(parents=True)
    table = dict(gpath._PREFIX_TO_BACKEND)
    table["gs"] = FakeGcs(str(root))
    monkeypatch.setattr(gpath, "_PREFIX_TO_BACKEND", table)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    assert not list(cwd.iterdir()), f"written under the working directory: {list(cwd.iterdir())}"


def test_user_path_keeps_uris_and_resolves_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("gs://bucket/run", "s3://b/k/x", "gs://bucket/run/"):
        p = user_path(uri)
        assert str(p) == uri.rstrip("/") and not is_local(p)
        assert str(p / "checkpoints") == uri.rstrip("/") + "/checkpoints"
    assert str(user_path("runs/a")) == str(tmp_path / "runs" / "a")
    assert str(user_path("~/x")) == os.path.join(os.path.expanduser("~"), "x")
    assert str(user_path("file:///tmp/x")) == "/tmp/x"
    with pytest.raises(PathError, match="unsupported URI scheme memory://"):
        user_path("memory://x")


def test_config_rejects_an_unknown_scheme_naming_the_key():
    from sessa_jax.train.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"run.output_dir='memory://x': expected a local path"):
        from_dict({**RAW, "run": {**RAW["run"], "output_dir": "memory://x"}})


def test_a_gs_run_dir_reaches_checkpoints_metrics_and_config_unchanged(gcs, monkeypatch):
    import orbax.checkpoint as ocp

    from sessa_jax.train import checkpoint as ck_mod
    from sessa_jax.train.config import from_dict, save_config
    from sessa_jax.train.loop import preflight, run_path
    from sessa_jax.train.metrics import MetricsWriter

    seen = []

    class Recorder:  # stands in for Orbax's manager, which would go to GCS via tensorstore
        def __init__(self, directory, options=None, **kw):
            seen.append(directory)

        def all_steps(self):
            return []

        def close(self):
            pass

    monkeypatch.setattr(ocp, "CheckpointManager", Recorder)
    cfg = from_dict(RAW)
    assert cfg.run.output_dir == "gs://bucket/run"
    assert str(run_path(cfg)) == "gs://bucket/run"
    assert "would write gs://bucket/run" in preflight(cfg).describe()
    run_dir = run_path(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    assert (gcs / "bucket" / "run").is_dir()

    ck = ck_mod.Checkpointer(run_dir, cfg.checkpoint)
    assert [str(d) for d in seen] == ["gs://bucket/run/checkpoints"]
    assert str(ck.directory) == "gs://bucket/run/checkpoints" and ck.steps() == []
    ck_mod.Checkpointer("gs://bucket/run", cfg.checkpoint)  # a plain string too
    assert str(seen[-1]) == "gs://bucket/run/checkpoints"

    save_config(cfg, run_dir / "config.yaml")
    assert "gs://bucket/run" in (gcs / "bucket" / "run" / "config.yaml").read_text()

    w = MetricsWriter(run_dir, tensorboard=False, remote_flush_sec=3600)
    for k in (1, 2, 3):
        w.write({"step": k, "loss": float(k)})
    w.flush()  # an object store cannot append: the whole file, on flush
    w.write({"step": 4, "loss": float("nan")})
    w.close()
    lines = (gcs / "bucket" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    w = MetricsWriter("gs://bucket/run", tensorboard=False)
    w.truncate_after(2)
    assert [r["step"] for r in w.history()] == [1, 2]
    w.close()

    write_text("gs://bucket/run/summary.json", "{}")
    append_text("gs://bucket/run/eval_results.jsonl", "a\n")
    append_text("gs://bucket/run/eval_results.jsonl", "b\n")
    assert (gcs / "bucket" / "run" / "eval_results.jsonl").read_text() == "a\nb\n"


def test_export_and_load_pretrained_through_a_gs_uri(gcs):
    from flax import nnx

    from sessa_jax.export import export_params, load_pretrained
    from sessa_jax.models.config import ModelConfig
    from sessa_jax.models.lm import DecoderLM

    mc = ModelConfig(family="transformer", vocab_size=32, d_model=16, n_layers=1, n_heads=2)
    model = DecoderLM(mc, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    s = export_params(params, mc, "gs://bucket/exp", max_shard_size="4KB")
    assert len(s["files"]) > 1 and s["out_dir"] == "gs://bucket/exp"
    got = sorted(os.listdir(gcs / "bucket" / "exp"))
    assert "config.json" in got and "model.safetensors.index.json" in got
    back = load_pretrained("gs://bucket/exp")
    x = np.arange(8, dtype=np.int32)[None]
    np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(model(x)))


def test_data_globs_and_prepared_shards_on_a_gs_uri(gcs):
    from sessa_jax.data.prepare import ReadOptions, is_prepared, prepare, read_meta
    from sessa_jax.data.sources import expand_paths

    d = gcs / "bucket" / "text"
    d.mkdir()
    for i in range(3):
        (d / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    files, problems = expand_paths(["gs://bucket/text/*.txt", "gs://bucket/text/doc0.txt",
                                    "gs://bucket/nope.txt"])
    assert files == [f"gs://bucket/text/doc{i}.txt" for i in range(3)]
    assert problems == [{"path": "gs://bucket/nope.txt", "reason": "file not found"}]
    meta = prepare(["gs://bucket/text/*.txt"], "gs://bucket/corpus", ReadOptions(),
                   shard_bytes=1, progress=False)
    assert meta["files_read"] == 3 and is_prepared("gs://bucket/corpus")
    assert read_meta("gs://bucket/corpus")["documents"] == 3
    names = sorted(os.listdir(gcs / "bucket" / "corpus"))
    assert "shard-00002.array_record" in names and not [n for n in names if "tmp" in n]
