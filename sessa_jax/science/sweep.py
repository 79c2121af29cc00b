"""A sweep: many matched runs of one task (families x learning rates x seeds x ablations),
run as concurrent processes on one machine, then summarised.

The plan is a YAML file (``configs/sweeps/*.yaml``)::

    task: configs/tasks/<task>.yaml     # the task config; its model is replaced per family
    sizing: 10m                         # configs/models/<family>-<sizing>.yaml
    budget_tokens: 12288000             # training tokens of every run
    eval_lengths: [4096, 8192]          # held-out accuracy at these lengths too
    overrides: [key=value, ...]         # every run
    runs:                               # priority order
      - {name: sessa-lr3e-4-s0, family: sessa, lr: 3.0e-4, seed: 0, overrides: [...],
         sizing: 10m-nomlp}             # sizing and overrides per run are optional

Each run is ``scripts/compare.py`` with one family, in OUT/<name>/ (its results.csv there);
a run whose results.csv exists is not run again. :func:`run_plan` keeps ``jobs`` of them going
at once (small models leave a GPU idle between kernels: several processes fill it), starts
no run after ``start_deadline_s`` and stops those still going at ``kill_deadline_s``.
:func:`report` reads every finished run into tables (the lr sweep; mean +- std over seeds at
each family's most-seeded lr; ablations) and plots (learning curves with seed bands,
accuracy against length, the Sessa stability statistics).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Optional

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RUN_KEYS = {"name", "family", "lr", "seed", "overrides", "sizing"}


class PlanError(ValueError):
    pass


def read_plan(path: str) -> dict:
    """The plan YAML -> dict, checked (names unique and file-safe, fields known)."""
    try:
        with open(path, encoding="utf-8") as f:
            plan = yaml.safe_load(f)
    except OSError as e:
        raise PlanError(f"{path}: cannot read the sweep plan ({e.strerror})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("runs"), list) or not plan["runs"]:
        raise PlanError(f"{path}: expected a mapping with a non-empty 'runs' list")
    for key in ("task", "budget_tokens"):
        if key not in plan:
            raise PlanError(f"{path}: missing '{key}'")
    seen = set()
    for i, r in enumerate(plan["runs"]):
        where = f"{path}: runs[{i}]"
        if not isinstance(r, dict) or not {"name", "family", "lr"} <= set(r):
            raise PlanError(f"{where}: expected a mapping with name, family and lr")
        extra = set(r) - _RUN_KEYS
        if extra:
            raise PlanError(f"{where}: unknown field(s) {sorted(extra)}; expected "
                            f"{sorted(_RUN_KEYS)}")
        name = str(r["name"])
        if name in seen or not all(c.isalnum() or c in "-_." for c in name):
            raise PlanError(f"{where}: name {name!r} is repeated or not letters, digits, -_.")
        seen.add(name)
    return plan


def run_command(plan: dict, run: dict, out_dir: str) -> list[str]:
    """The compare.py command line of one run."""
    cmd = [sys.executable, os.path.join(REPO, "scripts", "compare.py"),
           "--task", os.path.join(REPO, plan["task"]) if not os.path.isabs(plan["task"])
           else plan["task"],
           "--families", run["family"], "--sizing", str(run.get("sizing", plan.get("sizing",
                                                                                  "tiny"))),
           "--budget-tokens", str(int(plan["budget_tokens"])),
           "--out", os.path.join(out_dir, run["name"])]
    lengths = plan.get("eval_lengths") or []
    if lengths:
        cmd += ["--eval-lengths", ",".join(str(int(L)) for L in lengths)]
    cmd += list(plan.get("overrides") or [])
    cmd += [f"optimizer.lr={float(run['lr'])}", f"run.seed={int(run.get('seed', 0))}"]
    cmd += list(run.get("overrides") or [])
    return cmd


def _done(out_dir: str, name: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, name, "results.csv"))


def run_plan(plan: dict, out_dir: str, *, jobs: int = 4, start_deadline_s: float = math.inf,
             kill_deadline_s: float = math.inf, mem_fraction: Optional[float] = None,
             log=print) -> dict:
    """Run the plan's unfinished runs, ``jobs`` at a time -> {name: status}.

    Each process gets ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (default 0.9 / jobs) so that they
    share one GPU; logs go to OUT/<name>.log. Status: done, failed (rc), killed, not started.
    """
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.monotonic()
    todo = [r for r in plan["runs"] if not _done(out_dir, r["name"])]
    status = {r["name"]: "done (earlier)" for r in plan["runs"] if _done(out_dir, r["name"])}
    env = dict(os.environ)
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction or 0.9 / max(1, jobs):.3f}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    live: dict[str, tuple[subprocess.Popen, float]] = {}
    while todo or live:
        now = time.monotonic() - t0
        while todo and len(live) < jobs and now < start_deadline_s:
            r = todo.pop(0)
            logf = open(os.path.join(out_dir, f"{r['name']}.log"), "w", encoding="utf-8")
            p = subprocess.Popen(run_command(plan, r, out_dir), stdout=logf,
                                 stderr=subprocess.STDOUT, env=env, cwd=REPO)
            live[r["name"]] = (p, now)
            log(f"[{now:6.0f}s] start {r['name']}")
        if todo and now >= start_deadline_s:
            for r in todo:
                status[r["name"]] = "not started (deadline)"
            todo = []
        for name, (p, started) in list(live.items()):
            rc = p.poll()
            if rc is None and now >= kill_deadline_s:
                p.kill()
                p.wait()
                status[name] = "killed (deadline)"
                log(f"[{now:6.0f}s] killed {name} after {now - started:.0f}s")
                del live[name]
            elif rc is not None:
                status[name] = "done" if rc == 0 and _done(out_dir, name) else f"failed (rc {rc})"
                log(f"[{now:6.0f}s] {status[name]} {name} in {now - started:.0f}s")
                del live[name]
        time.sleep(2)
    with open(os.path.join(out_dir, "status.json"), "w", encoding="utf-8") as f:
        json.dump(status, f, indent=1)
    return status


# ------------------------------------------------------------------ report


def _read_run(out_dir: str, run: dict) -> Optional[dict]:
    d = os.path.join(out_dir, run["name"])
    path = os.path.join(d, "results.csv")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    hist_path = os.path.join(d, run["family"], "metrics.jsonl")
    hist = []
    if os.path.isfile(hist_path):
        with open(hist_path, encoding="utf-8") as f:
            hist = [json.loads(x) for x in f if x.strip()]
    acc = {int(k[4:]): float(v) for k, v in row.items() if k.startswith("acc@") and v != ""}
    return {**run, "seed": int(run.get("seed", 0)), "lr": float(run["lr"]), "acc": acc,
            "params": int(row["params"]), "tokens": int(row["tokens"]),
            "final_loss": float(row["final_loss"]), "tokens_per_s":
            float(row["steady_tokens_per_s"]), "history": hist,
            "ablation": bool(run.get("overrides") and any(not o.startswith("run.")
                                                          for o in run["overrides"])
                             or run.get("sizing"))}


def _ms(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def report(plan: dict, out_dir: str, results_dir: str) -> str:
    """Tables (markdown, also returned) and plots of every finished run into results_dir."""
    os.makedirs(results_dir, exist_ok=True)
    rows = [r for r in (_read_run(out_dir, run) for run in plan["runs"]) if r]
    if not rows:
        raise PlanError(f"{out_dir}: no finished run of the plan")
    T = min(min(r["acc"]) for r in rows)
    lengths = sorted({L for r in rows for L in r["acc"]})
    pct = lambda v: f"{100 * v:.1f}"
    lines = [f"Runs finished: {len(rows)} of {len(plan['runs'])}; held-out accuracy (%) at "
             f"{', '.join(map(str, lengths))}; trained at {T}; {int(plan['budget_tokens']):,} "
             "training tokens a run.", "", "**Learning-rate sweep (seed 0)**", "",
             "| family | lr | params | " + " | ".join(f"acc@{L}" for L in lengths)
             + " | held-out loss | tokens/s |", "|" + "---|" * (5 + len(lengths))]
    base = [r for r in rows if not r["ablation"]]
    for r in sorted((r for r in base if r["seed"] == 0), key=lambda r: (r["family"], r["lr"])):
        lines.append(f"| {r['family']} | {r['lr']:g} | {r['params']:,} | "
                     + " | ".join(pct(r["acc"].get(L, float("nan"))) for L in lengths)
                     + f" | {r['final_loss']:.3f} | {r['tokens_per_s']:,.0f} |")
    groups = defaultdict(list)
    for r in base:
        groups[(r["family"], r["lr"])].append(r)
    best = {}
    for (fam, lr), g in groups.items():
        if len(g) > len(best.get(fam, [])):
            best[fam] = g
    lines += ["", "**Seeds (mean +- std over seeds, at each family's seeded lr)**", "",
              "| family | lr | seeds | " + " | ".join(f"acc@{L}" for L in lengths) + " |",
              "|" + "---|" * (3 + len(lengths))]
    for fam, g in sorted(best.items()):
        cells = []
        for L in lengths:
            xs = [r["acc"][L] for r in g if L in r["acc"]]
            m, s = _ms(xs) if xs else (float("nan"), float("nan"))
            cells.append(f"{pct(m)} +- {pct(s)}" if math.isfinite(s) else pct(m))
        lines.append(f"| {fam} | {g[0]['lr']:g} | {','.join(str(r['seed']) for r in g)} | "
                     + " | ".join(cells) + " |")
    abl = [r for r in rows if r["ablation"]]
    if abl:
        lines += ["", "**Ablations (seed 0)**", "", "| run | params | "
                  + " | ".join(f"acc@{L}" for L in lengths) + " |",
                  "|" + "---|" * (2 + len(lengths))]
        for r in abl:
            lines.append(f"| {r['name']} | {r['params']:,} | "
                         + " | ".join(pct(r["acc"].get(L, float("nan"))) for L in lengths) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(results_dir, "runs.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["name", "family", "lr", "seed", "params", "tokens", "final_loss",
                    "tokens_per_s"] + [f"acc@{L}" for L in lengths])
        for r in rows:
            w.writerow([r["name"], r["family"], r["lr"], r["seed"], r["params"], r["tokens"],
                        r["final_loss"], r["tokens_per_s"]]
                       + [r["acc"].get(L, "") for L in lengths])
    _plots(rows, best, lengths, T, results_dir)
    return text


def _plots(rows, best, lengths, T, results_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for fam, g in sorted(best.items()):
        curves = [[(h["step"], h["eval/accuracy"]) for h in r["history"] if "eval/accuracy" in h]
                  for r in g]
        curves = [c for c in curves if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        steps = np.array([s for s, _ in curves[0][:n]])
        acc = np.array([[a for _, a in c[:n]] for c in curves])
        m = acc.mean(0)
        line, = ax.plot(steps, m, "o-", label=f"{fam} (lr {g[0]['lr']:g}, {len(curves)} seeds)")
        if len(curves) > 1:
            sd = acc.std(0, ddof=1)
            ax.fill_between(steps, m - sd, m + sd, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel="held-out accuracy", title="SymbolSoup learning curves")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, "learning_curves.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for fam, g in sorted(best.items()):
        Ls = [L for L in lengths if all(L in r["acc"] for r in g)]
        acc = np.array([[r["acc"][L] for L in Ls] for r in g])
        ax.errorbar(Ls, acc.mean(0), yerr=acc.std(0, ddof=1) if len(g) > 1 else None,
                    fmt="o-", capsize=3, label=fam)
    ax.axvline(T, color="gray", ls=":", label="trained length")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="eval length", ylabel="held-out accuracy", title="accuracy vs length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(results_dir, "accuracy_vs_length.png"), dpi=110)
    plt.close(fig)

    stab = [r for r in rows if any(k.startswith("stability/") for h in r["history"] for k in h)]
    if stab:
        names = ("score_max", "gamma_abs_max", "s_growth")
        fig, axes = plt.subplots(1, len(names) + 1, figsize=(4 * (len(names) + 1), 3.5))
        for r in stab:
            h = [x for x in r["history"] if "loss" in x]
            axes[0].plot([x["step"] for x in h], [x["loss"] for x in h], label=r["name"])
            for ax, nm in zip(axes[1:], names):
                pts = [(x["step"], max(v for k, v in x.items()
                                       if k.startswith("stability/") and k.endswith("/" + nm)))
                       for x in r["history"] if any(k.endswith("/" + nm) for k in x)]
                if pts:
                    ax.plot(*zip(*pts), label=r["name"])
        axes[0].set(title="train loss", xlabel="step")
        for ax, nm in zip(axes[1:], names):
            ax.set(title=f"max over layers: {nm}", xlabel="step")
            ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir, "stability.png"), dpi=110)
        plt.close(fig)
