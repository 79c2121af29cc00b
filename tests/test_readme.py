"""The README's commands run as written, on a fresh copy of the repository after the quickstart.

Every command line of every ```bash block (and the ```python block) of README.md is parsed here,
so README and test cannot drift: each must match exactly one rule below. A rule runs the line
verbatim in a temporary copy of configs/, scripts/ and the *.md files, appending only overrides
that make it short (fewer steps, fewer eval examples, one layer); or names why the line is not
walked here (GPU-only, hours on a CPU, the test suite itself, covered by another test). A README
command with no rule fails the test. The walked lines run as a few independent chains (CHAINS),
one test each.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# one layer: every walked model compiles in about half the time (layers are not scanned)
SHORT_RUN = (" run.steps=2 run.eval_every=0 checkpoint.every_steps=2 data.num_eval_examples=16"
             " model.n_layers=1")
# (prefix of the command line, what to append, or None with the reason it is not walked)
RULES = [
    ("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && sessa-train",
     " run.steps=10 run.eval_every=0 checkpoint.every_steps=5 data.num_eval_examples=64"
     " model.n_layers=1"),
    ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e",
     (None, "the test suite itself")),
    ("sessa-train --config configs/tasks/mqar-sessa.yaml",
     SHORT_RUN + " data.seq_len=128 run.global_batch_size=8"),
    ("XLA_FLAGS=--xla_force_host_platform_device_count=2 sessa-train", SHORT_RUN),
    ("sessa-train --config configs/tasks/text-sessa.yaml", SHORT_RUN + " run.global_batch_size=8"),
    ("sessa-eval", ""),
    ("python scripts/generate.py", ""),
    ("sessa-export", ""),
    ("sessa-import", ""),
    # resumes the imported run: its data settings (the quickstart's) must stay as they are
    ("sessa-train --config runs/q-continued", " run.steps=2 run.eval_every=0"),
    ("python scripts/plot_metrics.py", ""),
    ("python scripts/prepare_text.py", ""),
    ("sessa-prepare --input \"corpus/", (None, "the shape of a real corpus: needs your corpus/ "
                                                "and tok.json (the stdlib lines run it)")),
    ("STDLIB=", ""),  # a shell variable: the walk prefixes it to the lines that use it
    ("python scripts/train_tokenizer.py", ""),
    ("sessa-prepare --input \"$STDLIB", ""),
    ("sessa-train --config configs/tasks/text-stdlib.yaml", SHORT_RUN),
    ("python scripts/param_count.py", ""),
    ("python scripts/influence.py", ""),
    ("python scripts/compare.py", (None, "hours on a CPU; tests/test_compare.py runs it tiny")),
    ("python scripts/sweep.py", (None, "a GPU sweep of 19 ~10M-parameter runs; "
                                    "tests/test_sweep.py checks the plan and report")),
    ("python scripts/aot_compile.py", (None, "TPU compile of a pod config: tests/test_aot.py")),
    ("python scripts/aot_layer.py", (None, "TPU compiles at long T: tests/test_long_context.py "
                                           "runs it at a small width")),
    ("bash scripts/aot_pods.sh", (None, "compiles every pod config: tens of minutes")),
    ("python scripts/bench_multi_gpu.py", (None, "GPUs; tests/test_train_runs.py runs it on "
                                                 "fake CPU devices")),
    ("python scripts/bench_layer.py", (None, "a GPU benchmark")),
]
QUICKSTART = RULES[0][0]
ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=\$\(.*\)$")  # NAME=$(...): a shell variable


def readme_commands() -> list[str]:
    text = open(README, encoding="utf-8").read()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # trailing comments
            if line and not line.startswith("#"):
                cmds.append(" ".join(line.split()))
    return cmds


def rule_for(cmd: str):
    hits = [r for r in RULES if cmd.startswith(r[0])]
    assert len(hits) == 1, f"README command without exactly one rule in {__file__}: {cmd!r}"
    return hits[0][1]


def test_every_readme_command_has_a_rule():
    cmds = readme_commands()
    assert len(cmds) >= 15 and cmds[0].startswith(QUICKSTART), cmds[:2]
    for c in cmds:
        rule_for(c)
    used = {r[0] for r in RULES for c in cmds if c.startswith(r[0])}
    assert used == {r[0] for r in RULES}, f"rules for commands no longer in the README: " \
                                           f"{sorted({r[0] for r in RULES} - used)}"


@pytest.fixture
def clone(tmp_path):
    """A fresh copy of what a clone has at its root (no runs/, no data/), and its env."""
    d = tmp_path / "clone"
    d.mkdir()
    for name in ("configs", "scripts"):
        shutil.copytree(os.path.join(ROOT, name), d / name)
    for name in os.listdir(ROOT):
        if name.endswith(".md"):
            shutil.copy(os.path.join(ROOT, name), d / name)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = xla_flags()  # the suite's fast compiles only (a line may set its own)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    assert shutil.which("python", path=env["PATH"]), "python is not on PATH"
    # The console scripts of pyproject.toml, as `pip install -e .` makes them: an editable
    # install from before an entry point was added lacks it, so make the missing ones here.
    shims = d / ".bin"
    shims.mkdir()
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    for tool, target in scripts.items():
        if not shutil.which(tool, path=env["PATH"]):
            module, func = target.split(":")
            (shims / tool).write_text(  # the guard: spawned workers import this file
                f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\n"
                f"if __name__ == '__main__':\n    sys.exit({func}())\n")
            (shims / tool).chmod(0o755)
    env["PATH"] = str(shims) + os.pathsep + env["PATH"]
    return d, env


def run_line(line: str, cwd, env) -> str:
    p = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{line!r} exited {p.returncode}:\n{out[-4000:]}"
    for noise in ("Traceback", "WARNING:absl", "Exception ignored", "never retrieved"):
        assert noise not in out, f"{line!r} printed {noise!r}:\n{out[-4000:]}"
    return out


def walk_lines() -> tuple[list, list]:
    """-> ([(README command, the shell line the walk runs)], [(skipped command, why)])."""
    lines, skipped, variables = [], [], {}
    for cmd in readme_commands():
        rule = rule_for(cmd)
        if isinstance(rule, tuple):
            skipped.append((cmd, rule[1]))
            continue
        assign = ASSIGNMENT.match(cmd)
        if assign:  # each line runs in its own shell: set the variable where it is used
            variables[assign.group(1)] = cmd
            continue
        line = cmd
        if cmd.startswith(QUICKSTART):  # the environment exists: run the last step of the line
            line = "sessa-train" + cmd[len(QUICKSTART):]
        used = [a for name, a in variables.items() if re.search(rf"\${name}\b", cmd)]
        lines.append((cmd, " && ".join(used + [line + rule])))
    return lines, skipped


# The walked lines in independent chains, each a test of its own (xdist runs them side by
# side): a chain's lines need only earlier lines of the same chain. (chain, does a command
# belong to it); every walked line must be in exactly one chain.
CHAINS = [
    # the quickstart's run, and everything that reads it (eval, generate, export, plot), then
    # the hf import of its export and the imported run's training
    ("quickstart", lambda c: c.startswith(QUICKSTART) or "runs/quickstart" in c
     or "q-continued" in c or c.startswith("sessa-import")),
    ("mqar", lambda c: "configs/tasks/mqar-sessa.yaml" in c and c.startswith("sessa-train")),
    ("fsdp2", lambda c: "mesh.fsdp=2" in c),
    # prepare_text, then the run on its corpus; then the stdlib tokenizer, corpus and run (in
    # README order: train_tokenizer.py writes into the data/ that prepare_text made)
    ("text", lambda c: "data/corpus" in c or "stdlib" in c.lower()),
    ("scripts", lambda c: c.startswith(("python scripts/param_count.py",
                                        "python scripts/influence.py"))),
]


def chain_lines(name: str) -> list:
    lines, _ = walk_lines()
    return [x for x in lines if dict(CHAINS)[name](x[0])]


def test_every_walked_line_is_in_exactly_one_chain():
    lines, skipped = walk_lines()
    assert len(lines) >= 15 and lines[0][0].startswith(QUICKSTART), lines
    for cmd, _ in lines:
        hits = [name for name, pred in CHAINS if pred(cmd)]
        assert len(hits) == 1, f"README line in chains {hits} (want exactly one): {cmd!r}"
    assert all(chain_lines(name) for name, _ in CHAINS)
    print(f"walked {len(lines)} README commands; not walked: {skipped}")


@pytest.mark.parametrize("chain", [name for name, _ in CHAINS])
def test_readme_commands_run_as_written(chain, clone):
    """The walked README lines of one chain, in README order, in a fresh copy of the
    repository. In the quickstart chain the quickstart runs first; then the lines that only
    read its run, two at a time, the hf export followed by the hf import and the imported run's
    training (they need that export) as one of them. The README's python block that loads the
    hf export runs at its end."""
    from concurrent.futures import ThreadPoolExecutor

    d, env = clone
    lines = chain_lines(chain)
    outs = {}
    if chain == "quickstart":
        first, rest = lines[0], lines[1:]
        assert first[0].startswith(QUICKSTART)
        run_line(first[1], d, env)
        # the hf export, then (they need it) the import and the imported run's training: one
        # task, started first; the other readers of the quickstart's run beside it
        later = [x for x in rest if "q-continued" in x[0]]
        hf = [x for x in rest if x[0].startswith("sessa-export") and "--format hf" in x[0]]
        assert len(hf) == 1 and later, (hf, later)
        tasks = [hf + later] + [[x] for x in rest if x not in later + hf]
        with ThreadPoolExecutor(2) as pool:
            for done in pool.map(lambda t: [(c, run_line(l, d, env)) for c, l in t], tasks):
                outs.update(done)
    else:
        for cmd, line in lines:
            outs[cmd] = run_line(line, d, env)
    if chain == "quickstart":
        cwd = os.getcwd()
        try:  # the python block that loads the hf export, where the walk wrote it
            os.chdir(d)
            for code in python_blocks(hf=True):
                exec(compile(code, "README.md", "exec"), {})
        finally:
            os.chdir(cwd)
        example = [o for c, o in outs.items() if "--example 0" in c]
        assert example and "expected:" in example[0] and "correct" in example[0], example
        assert (d / "runs" / "quickstart" / "summary.json").exists()
        assert (d / "exported" / "config.json").exists() and (d / "curves.png").exists()
        assert (d / "runs" / "q-continued" / "summary.json").exists()
    elif chain == "mqar":
        assert (d / "runs" / "mqar-sessa" / "summary.json").exists()
    elif chain == "fsdp2":
        assert (d / "runs" / "q2" / "summary.json").exists()
    elif chain == "text":
        assert (d / "runs" / "text" / "summary.json").exists()
        assert (d / "runs" / "text-stdlib" / "summary.json").exists()
    else:
        assert len(outs) == 2 and all(outs.values()), outs
    print(f"walked {len(lines)} README commands of chain {chain}")


def python_blocks(hf: bool) -> list[str]:
    """The README's python blocks: those that read the walk's hf/ export, or the others."""
    text = open(README, encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [b for b in blocks if ('"hf/"' in b) == hf]


def test_readme_python_example_runs():
    blocks = python_blocks(hf=False)
    assert blocks and python_blocks(hf=True)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
