"""Sweep plans (sessa_jax.science.sweep): the plan is checked with messages naming the run,
each run becomes the compare.py command it should, and the report turns finished runs into
the sweep / seeds / ablation tables (mean and sample std over seeds) and the plots."""

import csv
import json
import os

import pytest
import yaml

from sessa_jax.science.sweep import PlanError, read_plan, report, run_command

PLAN = {"task": "configs/tasks/symbol_soup_paper-sessa.yaml", "sizing": "10m",
        "budget_tokens": 1000, "eval_lengths": [64], "overrides": ["run.log_every=1"],
        "runs": [{"name": "t-s0", "family": "transformer", "lr": 1e-3, "seed": 0},
                 {"name": "t-s1", "family": "transformer", "lr": 1e-3, "seed": 1},
                 {"name": "s-s0", "family": "sessa", "lr": 3e-4, "seed": 0},
                 {"name": "s-gb", "family": "sessa", "lr": 3e-4, "seed": 0,
                  "overrides": ["model.gamma_bias_init=0.0"]},
                 {"name": "s-never", "family": "sessa", "lr": 1e-4}]}


def _write(tmp_path, plan):
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump(plan))
    return str(p)


def test_plan_errors_name_the_run(tmp_path):
    bad = dict(PLAN, runs=[{"name": "a", "family": "sessa", "lr": 1e-3, "lrr": 2}])
    with pytest.raises(PlanError, match=r"runs\[0\].*lrr"):
        read_plan(_write(tmp_path, bad))
    dup = dict(PLAN, runs=[PLAN["runs"][0], PLAN["runs"][0]])
    with pytest.raises(PlanError, match=r"runs\[1\].*repeated"):
        read_plan(_write(tmp_path, dup))
    with pytest.raises(PlanError, match="budget_tokens"):
        read_plan(_write(tmp_path, {k: v for k, v in PLAN.items() if k != "budget_tokens"}))
    with pytest.raises(PlanError, match="cannot read"):
        read_plan(str(tmp_path / "missing.yaml"))


def test_command_and_report(tmp_path):
    plan = read_plan(_write(tmp_path, PLAN))
    cmd = run_command(plan, plan["runs"][3], str(tmp_path / "out"))
    assert cmd[cmd.index("--families") + 1] == "sessa"
    assert cmd[cmd.index("--sizing") + 1] == "10m"
    assert cmd[cmd.index("--eval-lengths") + 1] == "64"
    # the run's own overrides come last, so they win over the plan's
    assert cmd[-3:] == ["optimizer.lr=0.0003", "run.seed=0", "model.gamma_bias_init=0.0"]
    out = tmp_path / "out"
    accs = {"t-s0": 0.5, "t-s1": 0.7, "s-s0": 0.3, "s-gb": 0.1}
    for r in plan["runs"][:4]:
        d = out / r["name"] / r["family"]
        d.mkdir(parents=True)
        with open(out / r["name"] / "results.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["family", "params", "tokens", "final_loss", "acc@32", "acc@64",
                        "steady_tokens_per_s"])
            w.writerow([r["family"], 100, 1000, 1.0, accs[r["name"]], accs[r["name"]] / 2, 5.0])
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in [
            {"step": 1, "loss": 2.0, "stability/layer0/score_max": 1.0,
             "stability/layer0/gamma_abs_max": 0.5, "stability/layer0/s_growth": 1.1},
            {"step": 2, "eval/accuracy": accs[r["name"]]}]) + "\n")
    text = report(plan, str(out), str(tmp_path / "res"))
    assert "Runs finished: 4 of 5" in text
    assert "| transformer | 0.001 | 0,1 | 60.0 +- 14.1 | 30.0 +- 7.1 |" in text  # sample std
    assert "| s-gb | 100 | 10.0 | 5.0 |" in text  # the ablation is not a seed of s-s0
    assert "| sessa | 0.0003 | 0 | 30.0 | 15.0 |" in text
    for f in ("summary.md", "runs.csv", "learning_curves.png", "accuracy_vs_length.png",
              "stability.png"):
        assert os.path.getsize(tmp_path / "res" / f) > 0
