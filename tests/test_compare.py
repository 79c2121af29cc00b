"""A tiny matched comparison (2 families, 4 steps, seq_len 32, d_model 16) writes all four
result files with sane contents."""

import csv
import os

from sessa_jax.science.compare import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["model.d_model=16", "model.n_layers=1", "model.vocab_size=0", "data.seq_len=32",
             "data.num_eval_examples=16", "data.selective_copy.num_data_tokens=4",
             "run.global_batch_size=8", "run.eval_every=2", "run.log_every=1",
             "run.tensorboard=false", "checkpoint.every_steps=0"]


def test_compare_tiny(tmp_path):
    out = str(tmp_path / "cmp")
    rows = compare(os.path.join(REPO, "configs/tasks/selective_copy-sessa.yaml"),
                   ["sessa", "mamba"], out, budget_tokens=4 * 8 * 32, eval_lengths=[64],
                   overrides=OVERRIDES)
    for name in ("results.md", "results.csv", "learning_curves.png", "accuracy_vs_length.png"):
        assert os.path.getsize(os.path.join(out, name)) > 100, name
    assert [r["family"] for r in rows] == ["sessa", "mamba"]
    with open(os.path.join(out, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert [r["family"] for r in table] == ["sessa", "mamba"]
    for r in table:
        assert int(r["tokens"]) == 4 * 8 * 32 and int(r["steps"]) == 4   # equal budgets
        assert 0 < float(r["final_loss"]) < 20 and 0 < float(r["train_loss"]) < 20
        for L in (32, 64):
            assert 0.0 <= float(r[f"acc@{L}"]) <= 1.0
        assert int(r["params"]) > 0 and float(r["wall_s"]) > 0 and float(r["tokens_per_s"]) > 0
    md = open(os.path.join(out, "results.md")).read()
    assert "| sessa |" in md and "| mamba |" in md and "acc@64" in md
    for fam in ("sessa", "mamba"):
        assert os.path.exists(os.path.join(out, fam, "metrics.jsonl"))


def test_sizing_suffix_picks_the_matched_model_files():
    """--sizing 10m takes configs/models/<family>-10m.yaml: the three are within 1% in size."""
    import pytest

    from sessa_jax.models.sizing import param_count
    from sessa_jax.science.compare import family_raw_config
    from sessa_jax.train import from_dict

    task = os.path.join(os.path.dirname(__file__), "..", "configs", "tasks", "mqar-sessa.yaml")
    counts = {}
    for fam in ("sessa", "transformer", "mamba"):
        raw = family_raw_config(task, fam, "10m", ["run.output_dir=/tmp/unused"])
        assert raw["model"]["family"] == fam
        counts[fam] = param_count(from_dict(raw).model)
    assert max(counts.values()) / min(counts.values()) < 1.01, counts
    assert 9.5e6 < counts["sessa"] < 10.5e6
    with pytest.raises(ValueError, match="no configs/models/sessa-huge.yaml.*10m.*tiny"):
        family_raw_config(task, "sessa", "huge")
