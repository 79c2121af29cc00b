"""Streaming, parallel, resumable preparation of a text corpus into document shards.

    sessa-prepare --input 'corpus/**/*.jsonl' --output data/corpus --tokenizer tok.json \\
        --format jsonl --field text --workers 8

The input files (paths and globs, local or cloud) are listed and sorted once, then cut into
*shards* of consecutive files of about ``shard_bytes`` each. Worker processes tokenize one shard
at a time, streaming (a batch of documents in memory, never a file or the corpus), and write

    DIR/shard-KKKKK.array_record   records: a document's tokens + <eos> (cut into pieces of at
                                   most max_record_tokens), little-endian uint16 (vocab <= 65536)
                                   or int32, ``ndarray.tobytes()`` (never pickle)
    DIR/shard-KKKKK.index.npy      int64 (records, 2): tokens per record, 1 if it starts a document
    DIR/shard-KKKKK.json           the shard's report, written last: its presence means "done"

A shard is a pure function of its files and the options, so any number of workers writes the
same bytes, and a killed run resumes where it stopped: finished shards are kept (``plan.json``
records the job; another job in the same DIR needs ``overwrite``). ``meta.json`` is written when
every shard is done. Rows are packed from the documents at read time (:mod:`packing`), so one
preparation serves every ``seq_len``.

Bad files (missing, binary, not UTF-8, empty, malformed JSONL or Parquet) are reported by name:
``on_bad_file='error'`` stops the run with that message, ``'skip'`` lists them in the report and
in meta.json and goes on. The output directory may be local or a URI (gs://...): ArrayRecord
writes local files, so for a URI each shard is written to a local temporary directory and then
copied up (readers open gs:// shards directly).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
from typing import Iterator, Optional, Sequence

import numpy as np
from etils import epath

from sessa_jax.data.errors import DataError
from sessa_jax.data.packing import check_lengths, records_of
from sessa_jax.data.sources import (
    DOCUMENT_UNITS, FORMATS, BadFile, check_file, expand_paths, read_documents,
)
from sessa_jax.data.tokenizer import fingerprint, load_tokenizer
from sessa_jax.paths import PathError, is_local, user_path, write_text

FORMAT = "sessa_jax.documents.v1"
META_FILE, PLAN_FILE = "meta.json", "plan.json"
DEFAULT_SHARD_BYTES = 16 << 20  # the most input per shard by default
MIN_SHARD_BYTES = 256 << 10
DEFAULT_MAX_RECORD_TOKENS = 8192
_BATCH_CHARS = 1 << 20  # text tokenized per encode_batch call
KILL_HOOK = "SESSA_PREPARE_KILL_AT_SHARD"  # test hook: SIGKILL mid-way through shard K


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How files become documents and documents become records (part of the plan)."""

    tokenizer: str = "bytes"
    input_format: str = "auto"
    field: str = "text"
    document: str = "file"
    on_bad_file: str = "error"
    max_record_tokens: int = DEFAULT_MAX_RECORD_TOKENS

    def __post_init__(self):
        for name, value, choices in (("input_format", self.input_format, FORMATS),
                                     ("document", self.document, DOCUMENT_UNITS),
                                     ("on_bad_file", self.on_bad_file, ("error", "skip"))):
            if value not in choices:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        if not isinstance(self.max_record_tokens, int) or self.max_record_tokens < 1:
            raise ValueError(f"max_record_tokens={self.max_record_tokens!r}: expected a "
                             "positive integer")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def file_documents(path: str, tok, opts: ReadOptions, report: dict
                   ) -> Iterator[tuple[list[np.ndarray], int]]:
    """A file's documents as (records of one document, UTF-8 bytes), tokenized in batches.

    The file is checked whole first (one streaming pass), so a bad file is skipped whole:
    BadFile propagates when ``on_bad_file='error'``, else the file is added to
    ``report["skipped"]``. Counts go into ``report``.
    """
    try:
        check_file(path, opts.input_format, opts.field, opts.document)
    except BadFile as e:
        if opts.on_bad_file == "error":
            raise
        report["skipped"].append({"path": e.path, "reason": e.reason})
        return
    report["files_read"] += 1
    batch, chars = [], 0

    def flush():
        for text, ids in zip(batch, tok.encode_batch(batch)):
            nbytes = len(text.encode("utf-8"))
            report["documents"] += 1
            report["tokens"] += int(ids.size) + 1
            report["bytes"] += nbytes
            yield records_of(ids, tok.eos_id, opts.max_record_tokens), nbytes

    for doc in read_documents(path, opts.input_format, opts.field, opts.document):
        batch.append(doc)
        chars += len(doc)
        if chars >= _BATCH_CHARS:
            yield from flush()
            batch, chars = [], 0
    yield from flush()


def _new_report() -> dict:
    return {"files_read": 0, "documents": 0, "records": 0, "tokens": 0, "bytes": 0,
            "skipped": []}


_TOKENIZERS: dict = {}  # per process: spec -> tokenizer, loaded once


def _tokenizer(spec: str):
    if spec not in _TOKENIZERS:
        _TOKENIZERS[spec] = load_tokenizer(spec)
    return _TOKENIZERS[spec]


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def prepare_shard(out_dir: str, k: int, files: Sequence[str], opts: ReadOptions) -> dict:
    """Tokenize one shard's files into its three files; returns its report.

    A bad file in 'error' mode comes back as ``{"error": {"path", "reason"}}`` (plain data
    crosses process boundaries more safely than exception objects).
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    tok = _tokenizer(opts.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    out = user_path(out_dir)
    base = _shard_name(k)
    work = out if is_local(out) else pathlib.Path(tempfile.mkdtemp(prefix="sessa-prepare-"))
    tmp = work / f"{base}.array_record.{os.getpid()}.tmp"  # pid: an orphan cannot collide
    report, index = _new_report(), []
    kill = os.environ.get(KILL_HOOK)
    # group_size:1: every record is its own chunk, so a row reads only the records it needs.
    writer = ArrayRecordWriter(str(tmp), "group_size:1,max_parallelism:1")
    try:
        for path in files:
            for records, _ in file_documents(path, tok, opts, report):
                for j, rec in enumerate(records):
                    writer.write(rec.astype(dtype).tobytes())
                    index.append((rec.size, j == 0))
                    if kill is not None and int(kill) == k:
                        writer.close()
                        os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-shard
    except BadFile as e:
        writer.close()
        tmp.unlink()
        return {"error": {"path": e.path, "reason": e.reason}}
    writer.close()
    report["records"] = len(index)
    idx = np.asarray(index, np.int64).reshape(-1, 2)
    idx_tmp = work / f"{base}.index.{os.getpid()}.tmp"
    with open(idx_tmp, "wb") as f:
        np.save(f, idx, allow_pickle=False)
    _publish(tmp, out / f"{base}.array_record")
    _publish(idx_tmp, out / f"{base}.index.npy")
    if work is not out:
        shutil.rmtree(work, ignore_errors=True)
    report["shard"] = k
    write_text(out / f"{base}.json", json.dumps(report, indent=1))  # last: the shard is done
    return report


def _publish(local_tmp, dst) -> None:
    """A finished local temporary file -> its place: renamed on a local disk, copied up (then
    removed) on an object store."""
    if is_local(dst):
        os.replace(local_tmp, dst)
    else:
        # streamed through dst's own backend (a local path's copy() cannot write gs://)
        with open(local_tmp, "rb") as src, epath.Path(dst).open("wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
        os.remove(local_tmp)


def _job(args) -> dict:
    return prepare_shard(*args)


def _init_worker():
    # One tokenizer thread per process: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C


def plan_shards(sizes: Sequence[int], shard_bytes: int) -> list[tuple[int, int]]:
    """Consecutive file ranges [lo, hi) of about shard_bytes each (a big file is its own)."""
    shards, lo, acc = [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= shard_bytes:
            shards.append((lo, i + 1))
            lo, acc = i + 1, 0
    if lo < len(sizes):
        shards.append((lo, len(sizes)))
    return shards


class Progress:
    """One status line on stderr: shards, documents, tokens, MB/s, skipped files."""

    def __init__(self, total_shards: int, enabled: bool = True):
        self.total, self.enabled = total_shards, enabled
        self.t0 = time.perf_counter()
        self.done = self.docs = self.tokens = self.bytes = self.skipped = 0
        self.tty = sys.stderr.isatty()

    def add(self, rep: dict) -> None:
        self.done += 1
        self.docs += rep["documents"]
        self.tokens += rep["tokens"]
        self.bytes += rep["bytes"]
        self.skipped += len(rep["skipped"])
        if self.enabled:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            line = (f"prepare: shards {self.done}/{self.total} | {self.docs:,} docs | "
                    f"{self.tokens:,} tokens | {self.bytes / dt / 1e6:.2f} MB/s | "
                    f"{self.tokens / dt:,.0f} tok/s | {self.skipped} skipped")
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


def _clear(out: epath.Path) -> None:
    for p in list(out.glob("shard-*")) + [out / PLAN_FILE, out / META_FILE]:
        if p.exists():
            p.unlink()


def auto_shard_bytes(total_bytes: int) -> int:
    """Default shard size: ~64 shards of a small corpus (work for many workers), at most 16 MiB.

    A function of the inputs only, never of ``workers``, so the output does not depend on it.
    """
    return min(DEFAULT_SHARD_BYTES, max(MIN_SHARD_BYTES, total_bytes // 64))


def prepare(inputs: Sequence[str], output_dir: str, opts: ReadOptions = ReadOptions(), *,
            workers: int = 1, shard_bytes: Optional[int] = None, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Prepare ``inputs`` into ``output_dir`` (see the module docstring); returns meta.json.

    ``workers`` 1 tokenizes in this process; more use a process pool (same bytes either way).
    ``shard_bytes`` None: ``auto_shard_bytes`` of the inputs' total size.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r}: expected a positive integer")
    if shard_bytes is not None and (not isinstance(shard_bytes, int) or shard_bytes < 1):
        raise ValueError(f"shard_bytes={shard_bytes!r}: expected a positive integer")
    try:
        out = user_path(output_dir)
    except PathError as e:
        raise DataError(str(e)) from None
    if (out / META_FILE).exists() and not overwrite:
        raise DataError(f"{output_dir}: already holds a prepared corpus ({META_FILE}); "
                        "pass overwrite=True (--overwrite) to replace it")
    files, problems = expand_paths(inputs)
    skipped = []
    for p in problems:
        if opts.on_bad_file == "error":
            raise DataError(f"{p['path']}: {p['reason']} (on_bad_file='skip' would skip it)")
        skipped.append(p)
    if not files:
        raise DataError(f"no input files in {list(inputs)}"
                        + (f" ({skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""))
    tok = load_tokenizer(opts.tokenizer)  # fails fast, naming the file
    sizes = [epath.Path(f).stat().length for f in files]
    if shard_bytes is None:
        shard_bytes = auto_shard_bytes(sum(sizes))
    shards = plan_shards(sizes, shard_bytes)
    plan = {"format": FORMAT, "options": dataclasses.asdict(opts),
            "tokenizer_sha256": fingerprint(tok), "shard_bytes": shard_bytes,
            "files": [[f, s] for f, s in zip(files, sizes)], "shards": shards,
            "input_problems": skipped}
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as read back
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(out)
    plan_path = out / PLAN_FILE
    if plan_path.exists():
        if json.loads(plan_path.read_text()) != plan:
            raise DataError(f"{output_dir}: holds an unfinished preparation of other inputs or "
                            "options (plan.json); pass --overwrite to start again")
    else:
        plan_path.write_text(json.dumps(plan, indent=1))
    for stale in out.glob("shard-*.tmp"):  # a killed run's partial files
        stale.unlink()
    done = {k for k in range(len(shards)) if (out / f"{_shard_name(k)}.json").exists()}
    jobs = [(str(out), k, files[lo:hi], opts) for k, (lo, hi) in enumerate(shards)
            if k not in done]
    bar = Progress(len(shards), progress)
    for k in sorted(done):
        bar.add(json.loads((out / f"{_shard_name(k)}.json").read_text()))
    try:
        if workers == 1 or len(jobs) <= 1:
            results = map(_job, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(
                min(workers, len(jobs)), initializer=_init_worker)
            results = pool.imap_unordered(_job, jobs)
        for rep in results:
            if "error" in rep:
                e = rep["error"]
                raise DataError(f"{e['path']}: {e['reason']} (on_bad_file='skip' would skip it)")
            bar.add(rep)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return _finish(out, plan, tok, opts, len(shards))


def _finish(out: epath.Path, plan: dict, tok, opts: ReadOptions, num_shards: int) -> dict:
    reports = [json.loads((out / f"{_shard_name(k)}.json").read_text())
               for k in range(num_shards)]
    total = {key: sum(r[key] for r in reports)
             for key in ("files_read", "documents", "records", "tokens", "bytes")}
    skipped = plan["input_problems"] + [s for r in reports for s in r["skipped"]]
    if total["documents"] == 0:
        what = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        raise DataError("no usable documents in the inputs" + (f" ({what})" if what else ""))
    meta = {
        "format": FORMAT,
        "tokenizer": opts.tokenizer,
        "tokenizer_sha256": plan["tokenizer_sha256"],
        "vocab_size": int(tok.vocab_size),
        "pad_id": int(tok.pad_id), "bos_id": int(tok.bos_id), "eos_id": int(tok.eos_id),
        "dtype": token_dtype(tok.vocab_size).str,
        "options": plan["options"],
        "shards": [{"records": f"{_shard_name(k)}.array_record",
                    "index": f"{_shard_name(k)}.index.npy", "num_records": r["records"],
                    "tokens": r["tokens"]} for k, r in enumerate(reports)],
        **total,
        "files_skipped": len(skipped),
        "skipped": skipped,
    }
    write_text(out / META_FILE, json.dumps(meta, indent=1))
    return meta


def read_meta(directory: str) -> dict:
    path = user_path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the prepared corpus' meta ({e})") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format={meta.get('format')!r}, expected {FORMAT!r} "
                        "(prepare the corpus again with sessa-prepare)")
    return meta


def is_prepared(path: str) -> bool:
    try:
        return (user_path(path) / META_FILE).is_file()
    except Exception:
        return False


class PreparedCorpus:
    """The records of a prepared directory: index arrays in memory, tokens read from disk.

    One ArrayRecord reader per shard, so that a read error names the file and the record index
    in it (:meth:`locate`). Riegeli checks a hash of every chunk (one record per chunk here):
    corrupted bytes fail the read, or land in padding and change nothing; they never decode as
    other tokens. A record whose size disagrees with the index is an error too.
    """

    def __init__(self, directory: str):
        import grain

        self.meta = meta = read_meta(directory)
        base = user_path(directory)
        lengths, starts = [], []
        self.paths, self.sources, self.first = [], [], []  # per non-empty shard
        total = 0
        for shard in meta["shards"]:
            rec, idx = base / shard["records"], base / shard["index"]
            if not rec.exists() or not idx.exists():
                raise DataError(f"{rec if not rec.exists() else idx}: shard listed in "
                                "meta.json is missing")
            try:
                with idx.open("rb") as f:
                    table = np.load(f, allow_pickle=False)
            except Exception as e:  # truncated or garbled .npy
                raise DataError(f"{idx}: cannot read this shard index ({_reason(e)}); it is "
                                "truncated or corrupted: prepare the corpus again") from None
            if table.shape != (shard["num_records"], 2) or table.dtype.kind not in "iu":
                raise DataError(f"{idx}: a {table.dtype} table of shape {table.shape}, "
                                f"meta.json says {shard['num_records']} records (int64, 2 "
                                "columns): prepare the corpus again")
            check_lengths(table[:, 0], str(idx))
            lengths.append(table[:, 0].astype(np.int64))
            starts.append(table[:, 1].astype(bool))
            if not shard["num_records"]:
                continue
            try:
                src = grain.sources.ArrayRecordDataSource([str(rec)])
                n = len(src)
            except Exception as e:  # the C++ reader raises RuntimeError with Riegeli's reason
                raise DataError(f"{rec}: cannot open this ArrayRecord shard ({_reason(e)}); it "
                                "is truncated or corrupted: prepare the corpus again") from None
            if n != shard["num_records"]:
                raise DataError(f"{rec}: holds {n} records, meta.json and {idx.name} list "
                                f"{shard['num_records']}: prepare the corpus again")
            self.paths.append(str(rec))
            self.sources.append(src)
            self.first.append(total)
            total += n
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.starts_doc = np.concatenate(starts) if starts else np.zeros(0, bool)
        self.dtype = np.dtype(meta["dtype"])
        if total != len(self.lengths):
            raise DataError(f"{directory}: the index lists {len(self.lengths)} records, the "
                            f"shards hold {total}")

    def __len__(self) -> int:
        return len(self.lengths)

    def locate(self, i: int) -> tuple[str, int]:
        """Record i of the corpus -> (shard path, record index within the shard)."""
        if not 0 <= i < len(self.lengths):
            raise IndexError(f"record {i} out of range ({len(self.lengths)} records)")
        j = bisect.bisect_right(self.first, i) - 1
        return self.paths[j], i - self.first[j]

    def read(self, i: int) -> np.ndarray:
        """Record i's tokens, int32; DataError naming the shard and record if unreadable."""
        j = bisect.bisect_right(self.first, i) - 1
        path, rec = self.paths[j], i - self.first[j]
        try:
            raw = self.sources[j][rec]
            tokens = np.frombuffer(raw, dtype=self.dtype)
        except Exception as e:
            raise DataError(f"{path}: record {rec} is unreadable ({_reason(e)})") from None
        if tokens.size != self.lengths[i]:
            raise DataError(f"{path}: record {rec} has {tokens.size} tokens, the shard index "
                            f"says {int(self.lengths[i])}")
        return tokens.astype(np.int32)


def _reason(e: BaseException) -> str:
    """An exception as one short line (the C++ readers' messages span lines)."""
    text = " ".join(str(e).split())
    return text[:240] or type(e).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``sessa-prepare`` command (also ``scripts/prepare_text.py``)."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="sessa-prepare",
        description="Tokenize text/JSONL/Parquet files into ArrayRecord document shards "
                    "(streaming, parallel, resumable); train on the directory with "
                    "data.text.paths=[DIR].")
    ap.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                    help="files or globs, local or gs:// (quote globs)")
    ap.add_argument("--output", required=True, metavar="DIR",
                    help="output directory, local or gs://")
    ap.add_argument("--tokenizer", default="bytes",
                    help="'bytes' (default), a tokenizer.json, or a SentencePiece .model")
    ap.add_argument("--format", default="auto", choices=FORMATS, dest="input_format",
                    help="input format (auto: by extension: .jsonl, .parquet, else text)")
    ap.add_argument("--field", default="text", help="JSONL field / Parquet column (text)")
    ap.add_argument("--document", default="file", choices=DOCUMENT_UNITS,
                    help="text files: a whole file or each line is one document (file)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--shard-mb", type=float, default=None,
                    help="input MiB per shard (default: total/64, within [0.25, 16])")
    ap.add_argument("--max-record-tokens", type=int, default=DEFAULT_MAX_RECORD_TOKENS)
    ap.add_argument("--on-bad-file", choices=("error", "skip"), default="error")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a corpus (or unfinished preparation) in --output")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)
    try:
        opts = ReadOptions(args.tokenizer, args.input_format, args.field, args.document,
                           args.on_bad_file, args.max_record_tokens)
        meta = prepare(args.input, args.output, opts, workers=args.workers,
                       shard_bytes=(None if args.shard_mb is None
                                    else max(1, int(args.shard_mb * 2**20))),
                       overwrite=args.overwrite, progress=not args.quiet)
    except (DataError, ValueError) as e:
        print(f"sessa-prepare: error: {e}", file=sys.stderr)
        return 2
    for s in meta["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}", file=sys.stderr)
    print(json.dumps({k: meta[k] for k in ("tokenizer", "vocab_size", "files_read",
                                           "files_skipped", "documents", "tokens", "bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
