"""Language modelling on local text: reading, packing, ArrayRecord shards, and the text task.

Packing: each file is one document; documents are tokenized and concatenated, each followed by
``<eos>``, into one stream s of n tokens. Row r is s[r*T : r*T + T + 1] (T = seq_len; rows
overlap by one token so that no next-token target is lost), giving ceil((n-1)/T) rows of T+1
tokens; the final partial row is padded with the pad id. A row gives inputs = row[:-1],
targets = row[1:], loss_mask = (targets != pad). The last ``valid_fraction`` of the rows (at
least one, if the fraction is > 0) form the valid split; text has no test split.

Prepared directories (``prepare_text`` / ``scripts/prepare_text.py``) hold ``meta.json`` and
ArrayRecord shards ``{split}-{i:05d}-of-{n:05d}.array_record`` whose records are rows of T+1
little-endian int32 tokens (``ndarray.tobytes()``; never pickle).

Bad input (missing file, glob matching nothing, empty file, non-UTF-8 bytes, corpus too short
for one row) raises :class:`DataError` naming the file and the problem, or with
``on_bad_file='skip'`` is counted in the report and skipped. Everything is checked when the
task is built, on the main thread, never deep in a reader thread.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import json
import logging
import os
from typing import Iterable, Sequence

import numpy as np

from sessa_jax.data.config import DataConfig
from sessa_jax.data.errors import DataError
from sessa_jax.data.examples import row_example
from sessa_jax.data.tasks.base import Task, check_index, split_id
from sessa_jax.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

META_FILE = "meta.json"
FORMAT = "sessa_jax.packed_rows.v1"
ROW_DTYPE = np.dtype("<i4")
TEXT_SPLITS = ("train", "valid")


@dataclasses.dataclass
class ReadReport:
    """What reading a corpus did: files read, files skipped and why, sizes."""

    files_read: int = 0
    files_skipped: int = 0
    skipped: list = dataclasses.field(default_factory=list)  # [{"path": ..., "reason": ...}]
    documents: int = 0
    tokens: int = 0
    files: list = dataclasses.field(default_factory=list)  # paths read, in order

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bad(path: str, problem: str, on_bad_file: str, report: ReadReport) -> None:
    """Raise for a bad input, or record it as skipped."""
    if on_bad_file == "skip":
        report.files_skipped += 1
        report.skipped.append({"path": path, "reason": problem})
        log.warning("skipping %s: %s", path, problem)
        return
    raise DataError(f"{path}: {problem} (on_bad_file='skip' would skip it)")


def expand_paths(patterns: Iterable[str], on_bad_file: str = "error",
                 report: ReadReport | None = None) -> list[str]:
    """Files named by paths and globs, in order, without duplicates."""
    report = report if report is not None else ReadReport()
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = [p for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
            if not matches:
                _bad(pattern, "glob matched no files", on_bad_file, report)
            files.extend(matches)
        elif os.path.isdir(pattern):
            _bad(pattern, "is a directory without meta.json: pass a glob such as DIR/*.txt, or "
                 "a directory written by prepare_text", on_bad_file, report)
        elif not os.path.exists(pattern):
            _bad(pattern, "file not found", on_bad_file, report)
        else:
            files.append(pattern)
    return list(dict.fromkeys(files))


def read_text_file(path: str) -> str:
    """A file's text; raises DataError if unreadable, empty, or not UTF-8 (with byte offset)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {e.start} "
            f"(byte 0x{data[e.start]:02x}: {e.reason})"
        ) from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark is not content
    if not text.strip():
        raise DataError(f"{path}: empty file (only whitespace, {len(data)} bytes)")
    return text


def read_corpus(patterns: Sequence[str], tokenizer, on_bad_file: str = "error"):
    """Tokenize every file: (list of int32 (n_i,) arrays, ReadReport)."""
    if on_bad_file not in ("error", "skip"):
        raise ValueError(f"on_bad_file={on_bad_file!r}: expected 'error' or 'skip'")
    report = ReadReport()
    docs = []
    for path in expand_paths(patterns, on_bad_file, report):
        try:
            text = read_text_file(path)
        except DataError as e:
            if on_bad_file == "error":
                raise DataError(f"{e} (on_bad_file='skip' would skip it)") from None
            _bad(path, str(e).removeprefix(f"{path}: "), on_bad_file, report)
            continue
        ids = tokenizer.encode(text)
        docs.append(ids)
        report.files_read += 1
        report.files.append(path)
        report.documents += 1
        report.tokens += int(ids.size) + 1  # + <eos>
    if not docs:
        what = "; ".join(f"{s['path']}: {s['reason']}" for s in report.skipped[:5])
        raise DataError(f"no usable text files in {list(patterns)}" + (f" ({what})" if what else ""))
    return docs, report


def pack(docs: Sequence[np.ndarray], seq_len: int, eos_id: int, pad_id: int,
         names: Sequence[str] = ()) -> np.ndarray:
    """Concatenate docs with <eos> after each and cut rows: int32 (rows, seq_len + 1).

    Raises DataError if the stream is shorter than one full row of seq_len + 1 tokens.
    """
    stream = np.concatenate([np.append(np.asarray(d, np.int32), np.int32(eos_id)) for d in docs])
    n = stream.size
    if n < seq_len + 1:
        files = ", ".join(list(names)[:3]) + (" ..." if len(names) > 3 else "")
        raise DataError(
            f"corpus too short: {n} tokens (with <eos> separators) from {len(docs)} file(s)"
            + (f" [{files}]" if files else "")
            + f" cannot make even one row of seq_len+1={seq_len + 1} tokens"
        )
    rows = -(-(n - 1) // seq_len)
    padded = np.full(rows * seq_len + 1, pad_id, np.int32)
    padded[:n] = stream
    # Row r = padded[r*T : r*T + T + 1]: a strided view, copied into a dense array.
    starts = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return padded[starts]


def split_counts(num_rows: int, valid_fraction: float) -> tuple[int, int]:
    """(train rows, valid rows): the last round(f * rows) rows, at least one if f > 0."""
    if valid_fraction <= 0:
        return num_rows, 0
    n_valid = max(1, int(round(num_rows * valid_fraction)))
    if num_rows - n_valid < 1:
        raise DataError(
            f"corpus too short: it makes {num_rows} row(s), too few to hold out "
            f"valid_fraction={valid_fraction} and keep a train row; add text, lower seq_len, "
            "or set valid_fraction=0"
        )
    return num_rows - n_valid, n_valid


def _writer(path: str):
    from array_record.python.array_record_module import ArrayRecordWriter
    # group_size:1 makes every record its own chunk: fast random access, no warning on read.
    return ArrayRecordWriter(path, "group_size:1")


def write_shards(rows: np.ndarray, out_dir: str, split: str, records_per_shard: int) -> list[str]:
    """Write rows (R, T+1) as ArrayRecord shards; returns the file names (relative)."""
    num = max(1, -(-len(rows) // records_per_shard))
    names = []
    for i in range(num):
        name = f"{split}-{i:05d}-of-{num:05d}.array_record"
        w = _writer(os.path.join(out_dir, name))
        try:
            for row in rows[i * records_per_shard:(i + 1) * records_per_shard]:
                w.write(row.astype(ROW_DTYPE).tobytes())
        finally:
            w.close()
        names.append(name)
    return names


def prepare_text(inputs: Sequence[str], output_dir: str, seq_len: int, tokenizer: str = "bytes",
                 valid_fraction: float = 0.01, records_per_shard: int = 4096,
                 on_bad_file: str = "error", overwrite: bool = False) -> dict:
    """Tokenize, pack and write local text as ArrayRecord shards + meta.json; returns meta.

    The corpus is held in memory while packing (about 4 bytes per token).
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: expected a positive integer")
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction={valid_fraction!r}: expected a number in [0, 1)")
    if not isinstance(records_per_shard, int) or records_per_shard < 1:
        raise ValueError(f"records_per_shard={records_per_shard!r}: expected a positive integer")
    meta_path = os.path.join(output_dir, META_FILE)
    if os.path.exists(meta_path) and not overwrite:
        raise DataError(f"{output_dir}: already holds a prepared corpus ({META_FILE}); "
                        "pass overwrite=True (--overwrite) to replace it")
    tok = load_tokenizer(tokenizer)
    docs, report = read_corpus(inputs, tok, on_bad_file)
    rows = pack(docs, seq_len, tok.eos_id, tok.pad_id, report.files)
    n_train, n_valid = split_counts(len(rows), valid_fraction)
    os.makedirs(output_dir, exist_ok=True)
    for old in glob.glob(os.path.join(output_dir, "*-of-*.array_record")):
        os.remove(old)  # shards of a previous run would otherwise linger
    shards = {"train": write_shards(rows[:n_train], output_dir, "train", records_per_shard)}
    shards["valid"] = (write_shards(rows[n_train:], output_dir, "valid", records_per_shard)
                       if n_valid else [])
    meta = {
        "format": FORMAT,
        "seq_len": seq_len,
        "row_len": seq_len + 1,
        "dtype": "int32 little-endian",
        "tokenizer": tok.spec,
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "rows": {"train": n_train, "valid": n_valid},
        "shards": shards,
        **report.as_dict(),
    }
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the prepared corpus' meta ({e})") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format={meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _is_prepared(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META_FILE))


class _Rows:
    """Random access to the packed rows of one prepared split (ArrayRecord shards on disk).

    One reader per shard, so that a read error names the file and the record index in it.
    Riegeli checks a hash of every chunk: corrupted bytes fail the read (or land in padding and
    change nothing); they never decode as other tokens.
    """

    def __init__(self, directory: str, names: Sequence[str], count: int, row_len: int,
                 split: str = "train"):
        import grain

        self.split, self.row_len = split, row_len
        self.paths = [os.path.join(directory, n) for n in names]
        self.sources, self.starts = [], []
        total = 0
        for p in self.paths:
            if not os.path.isfile(p):
                raise DataError(f"{p}: shard listed in meta.json is missing")
            try:
                src = grain.sources.ArrayRecordDataSource([p])
                n = len(src)
            except Exception as e:  # the C++ reader raises RuntimeError with Riegeli's reason
                raise DataError(f"{p}: cannot open this ArrayRecord shard ({_reason(e)}); "
                                "it is truncated or corrupted: prepare the corpus again") from None
            self.sources.append(src)
            self.starts.append(total)
            total += n
        if total != count:
            raise DataError(f"{directory}: meta.json says {count} {split} rows, shards hold "
                            f"{total}")
        self.total = total

    def __len__(self) -> int:
        return self.total

    def locate(self, i: int) -> tuple[str, int]:
        """Row i of the split -> (shard path, record index within the shard)."""
        j = bisect.bisect_right(self.starts, i) - 1
        return self.paths[j], i - self.starts[j]

    def __getitem__(self, i: int) -> np.ndarray:
        j = bisect.bisect_right(self.starts, i) - 1
        path, rec = self.paths[j], i - self.starts[j]
        try:
            raw = self.sources[j][rec]
        except Exception as e:
            raise DataError(f"{path}: record {rec} ({self.split} row {i}) is unreadable "
                            f"({_reason(e)})") from None
        row = np.frombuffer(raw, dtype=ROW_DTYPE)
        if row.size != self.row_len:  # a foreign shard, or one written with another seq_len
            raise DataError(f"{path}: record {rec} ({self.split} row {i}) has {row.size} "
                            f"tokens, expected {self.row_len}")
        return row.astype(np.int32)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:240] or type(e).__name__)


class TextTask(Task):
    """Packed LM rows from raw text (packed in memory) or a prepared directory (on disk).

    Split sizes are the row counts of "train" and "valid"; "test" is not defined for text.
    ``report`` holds the reading report (files read/skipped and why) of the corpus.
    """

    name = "text"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        tc = cfg.text
        self.tokenizer = None
        paths = list(tc.paths)
        if len(paths) == 1 and _is_prepared(paths[0]):
            self._init_prepared(paths[0], tc.tokenizer)
        else:
            if any(_is_prepared(p) for p in paths):
                raise DataError(f"data.text.paths={paths}: a prepared directory must be the "
                                "only entry")
            self._init_raw(paths, tc)
        for s in TEXT_SPLITS:
            log.info("text %s split: %d rows of %d tokens", s, self.split_size(s), self.seq_len)

    def _init_raw(self, paths, tc):
        self.tokenizer = load_tokenizer(tc.tokenizer)
        self.vocab_size, self.pad_id = self.tokenizer.vocab_size, self.tokenizer.pad_id
        docs, report = read_corpus(paths, self.tokenizer, tc.on_bad_file)
        rows = pack(docs, self.seq_len, self.tokenizer.eos_id, self.pad_id, report.files)
        n_train, _ = split_counts(len(rows), tc.valid_fraction)
        self.rows = {"train": rows[:n_train], "valid": rows[n_train:]}
        self.report = report.as_dict()

    def _init_prepared(self, directory, tokenizer):
        meta = read_meta(directory)
        if meta["seq_len"] != self.seq_len:
            raise DataError(f"{directory}: prepared with seq_len={meta['seq_len']}, but "
                            f"data.seq_len={self.seq_len}; prepare it again with --seq-len "
                            f"{self.seq_len}")
        want = tokenizer if tokenizer == "bytes" else os.path.abspath(tokenizer)
        if want != meta["tokenizer"]:
            raise DataError(f"{directory}: prepared with tokenizer={meta['tokenizer']!r}, but "
                            f"data.text.tokenizer={tokenizer!r}")
        self.vocab_size, self.pad_id = int(meta["vocab_size"]), int(meta["pad_id"])
        self.rows = {s: _Rows(directory, meta["shards"][s], meta["rows"][s], meta["row_len"], s)
                     for s in TEXT_SPLITS}
        self.report = {k: meta.get(k) for k in ("files_read", "files_skipped", "skipped",
                                                "documents", "tokens", "files")}
        self.meta = meta

    def split_size(self, split: str) -> int:
        split_id(split)
        if split not in TEXT_SPLITS:
            raise ValueError(f"split={split!r}: the text task has only 'train' and 'valid'")
        return len(self.rows[split])

    def row(self, split: str, index: int) -> np.ndarray:
        """Packed row, int32 (T+1,)."""
        index = check_index(index)
        size = self.split_size(split)
        if index >= size:
            raise IndexError(f"text {split} row {index} out of range ({size} rows)")
        return np.asarray(self.rows[split][index], dtype=np.int32)

    def example(self, split: str, index: int) -> dict:
        return row_example(self.row(split, index), self.pad_id)

    def _tok(self):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.meta["tokenizer"])
        return self.tokenizer

    def decode(self, ids, skip_pad: bool = True) -> str:
        return self._tok().decode(ids)

    def token_names(self) -> list[str]:
        tok = self._tok()
        if tok.spec == "bytes":
            return ["<pad>", "<bos>", "<eos>"] + [f"0x{b:02x}" for b in range(256)]
        names = [tok.sp.id_to_piece(i) for i in range(tok.num_pieces)]
        names += [""] * (tok.vocab_size - len(names))
        for i, n in ((tok.pad_id, "<pad>"), (tok.bos_id, "<bos>"), (tok.eos_id, "<eos>")):
            names[i] = n
        return names
