"""Matched comparisons: one task, several model families, the same training-token budget.

For each family the task config's ``model`` section is replaced by a matched-size model:
``configs/models/<family>-<sizing>.yaml`` (``sizing="tiny"``: ~100k parameters, ``"10m"``,
``"125m"``, ``"350m"``: the families are width-matched in those files) or, with ``sizing="match"``, :func:`sessa_jax.models.sizing.match_widths` to the parameter
count of the task config's own model at its depth. ``key=value`` overrides then apply to
every family (e.g. ``model.d_model=16``). Steps are set so that every family sees
``budget_tokens`` training tokens (steps = budget / (global_batch_size * seq_len)); each run
goes to OUT/<family>/ via :func:`sessa_jax.train.train`, is evaluated on held-out data at the
trained length and at each longer length (:func:`sessa_jax.train.evaluate_checkpoint` with
``data.seq_len=L``), and the results are written to OUT: results.md, results.csv,
learning_curves.png, accuracy_vs_length.png.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
from typing import Optional, Sequence

from sessa_jax.models.sizing import FAMILIES, config_fields, match_widths, param_count
from sessa_jax.train import evaluate_checkpoint, from_dict, train
from sessa_jax.train.config import apply_overrides, read_yaml, to_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model_yaml(path: str, base_dir: str) -> dict:
    for cand in (os.path.join(base_dir, path), path, os.path.join(REPO, path)):
        if os.path.isfile(cand):
            return read_yaml(cand, "model")
    raise FileNotFoundError(f"model file {path!r} not found")


def family_raw_config(task_config: str, family: str, sizing: str = "tiny",
                      overrides: Sequence[str] = ()) -> dict:
    """The task config as a raw dict with its model replaced by ``family``'s matched model."""
    raw = read_yaml(task_config)
    base_dir = os.path.dirname(os.path.abspath(task_config))
    model = raw.get("model") or {}
    if isinstance(model, str):
        model = _model_yaml(model, base_dir)
    if sizing != "match":
        path = os.path.join(REPO, "configs", "models", f"{family}-{sizing}.yaml")
        if not os.path.isfile(path):
            have = sorted({n.rsplit("-", 1)[1][:-5] for n in
                           os.listdir(os.path.join(REPO, "configs", "models"))
                           if n.startswith(f"{family}-") and n.endswith(".yaml")})
            raise ValueError(f"sizing={sizing!r}: no configs/models/{family}-{sizing}.yaml; "
                             f"expected 'match' or one of {', '.join(have)}")
        new = _model_yaml(path, base_dir)
    else:
        ref = from_dict({**raw, "model": model, "run": {**raw.get("run", {}),
                                                        "output_dir": "/tmp/unused"}},
                        base_dir)
        fixed = {k: v for k, v in dict(vocab_size=ref.model.vocab_size,
                                       tie_embeddings=ref.model.tie_embeddings).items()}
        m = match_widths(param_count(ref.model), ref.model.n_layers, [family], **fixed)[family]
        new = config_fields(m.config)
    new = dict(new)
    new["family"] = family
    raw["model"] = new
    return apply_overrides(raw, list(overrides))


def _history(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_family(task_config: str, family: str, out_dir: str, *, budget_tokens: Optional[int],
               eval_lengths: Sequence[int] = (), sizing: str = "tiny",
               overrides: Sequence[str] = ()) -> dict:
    """Train and evaluate one family -> a result row (dict)."""
    run_dir = os.path.join(out_dir, family)
    raw = family_raw_config(task_config, family, sizing, overrides)
    raw.setdefault("run", {})["output_dir"] = run_dir
    cfg = from_dict(raw, os.path.dirname(os.path.abspath(task_config)))
    G, T = cfg.run.global_batch_size, cfg.data.seq_len
    if budget_tokens:
        steps = max(1, int(budget_tokens) // (G * T))
        raw = apply_overrides(to_dict(cfg), [f"run.steps={steps}"])
        cfg = from_dict(raw, check_task=True)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    s = result.summary
    hist = _history(run_dir)
    train_losses = [r["loss"] for r in hist if "loss" in r]
    row = {
        "family": family, "params": param_count(cfg.model), "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers, "steps": s["steps"], "tokens": s["tokens_seen"],
        "train_loss": train_losses[-1] if train_losses else float("nan"),
        "wall_s": wall, "tokens_per_s": s["tokens_seen"] / wall if wall > 0 else float("nan"),
        "seq_len": T, "acc": {}, "eval_loss": {},
    }
    tps = sorted(r["tokens_per_sec"] for r in hist if r.get("tokens_per_sec"))
    row["steady_tokens_per_s"] = tps[len(tps) // 2] if tps else float("nan")  # median
    for L in [T] + [L for L in eval_lengths if L != T]:
        ev = evaluate_checkpoint(run_dir, overrides=[f"data.seq_len={L}"])
        row["acc"][L] = ev.get("accuracy", float("nan"))
        row["eval_loss"][L] = ev.get("loss", float("nan"))
    row["final_loss"] = row["eval_loss"][T]
    row["history"] = [{**r, "tokens": r["step"] * G * T} for r in hist]
    return row


def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.1%}" if pct else (f"{v:.4f}" if isinstance(v, float) else str(v))


def write_results(out_dir: str, rows: Sequence[dict], task_config: str) -> None:
    lengths = sorted({L for r in rows for L in r["acc"]})
    cols = ["family", "params", "tokens", "steps", "train_loss", "final_loss"]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols + [f"acc@{L}" for L in lengths] + [f"loss@{L}" for L in lengths]
                   + ["wall_s", "tokens_per_s", "steady_tokens_per_s"])
        for r in rows:
            w.writerow([r[c] for c in cols] + [r["acc"].get(L, "") for L in lengths]
                       + [r["eval_loss"].get(L, "") for L in lengths]
                       + [f"{r['wall_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                          f"{r['steady_tokens_per_s']:.1f}"])
    lines = [f"# Matched comparison: {os.path.basename(task_config)}", "",
             f"Trained at seq_len {rows[0]['seq_len']}; final loss = held-out loss at that "
             "length; accuracy = held-out accuracy at each eval length. Wall time = the training "
             "call (compilation and in-run evals included); tokens/s = tokens / wall time; "
             "steady tokens/s = median of the logged training throughput.", "",
             "| family | params | tokens | final loss | "
             + " | ".join(f"acc@{L}" for L in lengths)
             + " | wall time (s) | tokens/s | steady tokens/s |",
             "|" + "---|" * (7 + len(lengths))]
    for r in rows:
        lines.append(f"| {r['family']} | {r['params']:,} | {r['tokens']:,} | "
                     f"{_fmt(r['final_loss'])} | "
                     + " | ".join(_fmt(r["acc"].get(L), pct=True) for L in lengths)
                     + f" | {r['wall_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                     + (f"{r['steady_tokens_per_s']:,.0f} |"
                        if math.isfinite(r["steady_tokens_per_s"]) else "- |"))
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def plot_results(out_dir: str, rows: Sequence[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        h = r["history"]
        tr = [(x["tokens"], x["loss"]) for x in h if "loss" in x]
        ev = [(x["tokens"], x["eval/accuracy"]) for x in h if "eval/accuracy" in x]
        if tr:
            a1.plot(*zip(*tr), label=r["family"])
        if ev:
            a2.plot(*zip(*ev), "o-", label=r["family"])
    a1.set(xlabel="training tokens", ylabel="train loss", title="loss")
    a2.set(xlabel="training tokens", ylabel="eval accuracy", title="held-out accuracy")
    a1.legend(); a2.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "learning_curves.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        Ls = sorted(r["acc"])
        ax.plot(Ls, [r["acc"][L] for L in Ls], "o-", label=r["family"])
    ax.axvline(rows[0]["seq_len"], color="gray", ls=":", label="trained length")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="eval sequence length", ylabel="held-out accuracy",
           title="accuracy vs length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_vs_length.png"), dpi=110)
    plt.close(fig)


def compare(task_config: str, families: Sequence[str], out_dir: str, *,
            budget_tokens: Optional[int] = None, eval_lengths: Sequence[int] = (),
            sizing: str = "tiny", overrides: Sequence[str] = ()) -> list[dict]:
    """Run every family and write the four result files into ``out_dir`` -> result rows."""
    for fam in families:
        if fam not in FAMILIES:
            raise ValueError(f"family {fam!r}: expected one of {', '.join(FAMILIES)}")
    os.makedirs(out_dir, exist_ok=True)
    if budget_tokens is None:  # the task config's own budget, the same for every family
        c = from_dict(family_raw_config(task_config, families[0], sizing, overrides),
                      os.path.dirname(os.path.abspath(task_config)))
        budget_tokens = c.run.steps * c.run.global_batch_size * c.data.seq_len
    rows = [run_family(task_config, fam, out_dir, budget_tokens=budget_tokens,
                       eval_lengths=eval_lengths, sizing=sizing, overrides=overrides)
            for fam in families]
    write_results(out_dir, rows, task_config)
    plot_results(out_dir, rows)
    return rows
