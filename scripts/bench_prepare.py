#!/usr/bin/env python
"""Preparation throughput and peak memory: a corpus, and ten times that corpus.

    python scripts/bench_prepare.py --workers 2 --out bench_prepare.json --markdown

Corpus: the Python standard library's top-level ``*.py`` files (every machine has them; a few
MB). "10x" is ten copies of it in separate directories (other file names, same text). A BPE
tokenizer (vocab 8192) is trained on the corpus first (scripts/train_tokenizer.py). Each
preparation runs ``sessa-prepare`` in its own process tree; a sampler sums the resident memory
(VmRSS) of that tree every 50 ms, so "peak" is the whole preparation (parent + workers), not
one process. MB/s counts input UTF-8 bytes of the documents, tokens/s includes the <eos>.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = kb * 1024
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def run_prepare(inputs, out, tokenizer, workers) -> dict:
    cmd = [sys.executable, "-m", "sessa_jax.data.prepare", "--input", *inputs, "--output",
           str(out), "--tokenizer", tokenizer, "--workers", str(workers), "--shard-mb", "1",
           "--quiet", "--overwrite"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(p.pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out_text, err = p.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if p.returncode:
        raise SystemExit(f"sessa-prepare failed ({p.returncode}): {err}")
    meta = json.loads(out_text.strip().splitlines()[-1])
    return {"wall_s": wall, "bytes": meta["bytes"], "tokens": meta["tokens"],
            "documents": meta["documents"], "MB_per_s": meta["bytes"] / wall / 1e6,
            "tokens_per_s": meta["tokens"] / wall, "peak_rss_MiB": peak[0] / 2**20,
            "workers": workers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for c in range(args.copies):
            d = tmp / "corpus" / f"copy{c:02d}"
            d.mkdir(parents=True)
            for f in files:
                shutil.copyfile(f, d / f.name)
        tok = tmp / "tokenizer.json"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "scripts/train_tokenizer.py"), "--input",
                        str(tmp / "corpus/copy00/*.py"), "--output", str(tok), "--vocab-size",
                        str(args.vocab_size)], check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        tok_s = time.perf_counter() - t0
        one = run_prepare([str(tmp / "corpus/copy00/*.py")], tmp / "p1", str(tok), args.workers)
        ten = run_prepare([str(tmp / "corpus/copy*/*.py")], tmp / "p10", str(tok), args.workers)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()}: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                   f"Python {platform.python_version()}",
        "corpus": f"{len(files)} top-level *.py files of {stdlib}",
        "tokenizer": f"byte-level BPE, vocab {args.vocab_size} (trained in {tok_s:.1f} s)",
        "load_average_1min_at_end": os.getloadavg()[0],  # the machine is shared
        "corpus_x1": one, f"corpus_x{args.copies}": ten,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        print("\n| corpus | documents | MB | tokens | wall s | MB/s | tokens/s | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, r in (("x1", one), (f"x{args.copies}", ten)):
            print(f"| {name} | {r['documents']:,} | {r['bytes'] / 1e6:.1f} | {r['tokens']:,} | "
                  f"{r['wall_s']:.1f} | {r['MB_per_s']:.2f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['peak_rss_MiB']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
