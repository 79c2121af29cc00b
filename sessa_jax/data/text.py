"""The text task: language modelling rows packed at read time from documents.

``data.text.paths`` is either exactly one directory prepared by ``sessa-prepare``
(:mod:`sessa_jax.data.prepare`: document shards on disk, read on demand; the way for real
corpora), or files and globs, read, checked and tokenized in memory when the task is built
(small corpora; the same reader as preparation, so the same documents and errors).

Either way the documents form one stream that :class:`~sessa_jax.data.packing.PackedRows` cuts
into rows of ``seq_len`` + 1 tokens with ``segment_ids``/``positions``; the last
``valid_fraction`` of the rows are the valid split (text has no test split). Rows depend only
on (corpus, seq_len), so the pipeline's (seed, step) -> rows map holds on any host count.

Bad input raises :class:`DataError` naming the file and the problem, or with
``on_bad_file='skip'`` is listed in ``report["skipped"]``; that is checked when the task is
built, on the main thread. A prepared directory's shards are opened and their indexes checked
then too; a record that cannot be read later (a corrupted shard) raises a DataError naming the
shard file, the record index in it and the row that needed it, which the pipeline turns into an
all-pad, unscored row with ``data.on_bad_record='skip'`` (counted in ``skipped_records``).
"""

from __future__ import annotations

import logging

import numpy as np

from sessa_jax.data.config import DataConfig, TextConfig
from sessa_jax.data.errors import DataError
from sessa_jax.data.packing import PackedRows, pad_example, split_rows, stream_rows
from sessa_jax.data.prepare import (
    DEFAULT_MAX_RECORD_TOKENS, PreparedCorpus, ReadOptions, _new_report, file_documents,
    is_prepared,
)
from sessa_jax.data.sources import BadFile, expand_paths
from sessa_jax.data.tasks.base import Task, check_index, split_id
from sessa_jax.data.tokenizer import fingerprint, load_tokenizer

log = logging.getLogger(__name__)

TEXT_SPLITS = ("train", "valid")


def read_options(tc: TextConfig) -> ReadOptions:
    return ReadOptions(tc.tokenizer, tc.input_format, tc.field, tc.document, tc.on_bad_file,
                       DEFAULT_MAX_RECORD_TOKENS)


def read_corpus(patterns, tokenizer, opts: ReadOptions):
    """Tokenize files in memory: (records list, starts-document flags, report dict)."""
    report = _new_report()
    files, problems = expand_paths(patterns)
    for p in problems:
        if opts.on_bad_file == "error":
            raise DataError(f"{p['path']}: {p['reason']} (on_bad_file='skip' would skip it)")
        report["skipped"].append(p)
    records, starts = [], []
    for path in files:
        try:
            for recs, _ in file_documents(path, tokenizer, opts, report):
                records.extend(recs)
                starts.extend([True] + [False] * (len(recs) - 1))
        except BadFile as e:
            raise DataError(f"{e} (on_bad_file='skip' would skip it)") from None
    report["records"] = len(records)
    report["files_skipped"] = len(report["skipped"])
    if not records:
        what = "; ".join(f"{s['path']}: {s['reason']}" for s in report["skipped"][:5])
        raise DataError(f"no usable text in {list(patterns)}" + (f" ({what})" if what else ""))
    return records, np.asarray(starts, bool), report


def text_vocab_size(tc: TextConfig) -> int:
    """The tokenizer's vocabulary (cheap: reads the tokenizer or meta.json, not the corpus)."""
    paths = list(tc.paths)
    if len(paths) == 1 and is_prepared(paths[0]):
        from sessa_jax.data.prepare import read_meta
        return int(read_meta(paths[0])["vocab_size"])
    return int(load_tokenizer(tc.tokenizer).vocab_size)


class TextTask(Task):
    """Packed LM rows with document boundaries; see the module docstring.

    ``report``: files read/skipped and why, documents, tokens, bytes.
    """

    name = "text"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        tc = cfg.text
        paths = list(tc.paths)
        self.tokenizer = load_tokenizer(tc.tokenizer)
        self.vocab_size, self.pad_id = self.tokenizer.vocab_size, self.tokenizer.pad_id
        if len(paths) == 1 and is_prepared(paths[0]):
            corpus = PreparedCorpus(paths[0])
            meta = corpus.meta
            if meta["tokenizer_sha256"] != fingerprint(self.tokenizer):
                raise DataError(f"{paths[0]}: prepared with tokenizer={meta['tokenizer']!r} "
                                f"(sha256 {meta['tokenizer_sha256'][:12]}), but "
                                f"data.text.tokenizer={tc.tokenizer!r} is another one")
            lengths, starts, read = corpus.lengths, corpus.starts_doc, corpus.read
            self.report = {k: meta[k] for k in ("files_read", "files_skipped", "skipped",
                                                "documents", "tokens", "bytes")}
            self.corpus = corpus
        else:
            if any(is_prepared(p) for p in paths):
                raise DataError(f"data.text.paths={paths}: a prepared directory must be the "
                                "only entry")
            records, starts, self.report = read_corpus(paths, self.tokenizer, read_options(tc))
            lengths = np.asarray([r.size for r in records], np.int64)
            read = records.__getitem__
        n = int(np.sum(lengths))
        if n < self.seq_len + 1:
            raise DataError(
                f"corpus too short: {n} tokens (with <eos> separators) from "
                f"{self.report['files_read']} file(s) {paths} cannot make even one row of "
                f"seq_len+1={self.seq_len + 1} tokens")
        stream = PackedRows(lengths, starts, read, self.seq_len, self.pad_id)
        n_train, _ = split_rows(stream.total_rows, tc.valid_fraction)
        self.rows = {"train": stream.view(0, n_train),
                     "valid": stream.view(n_train, stream.total_rows)}
        assert stream.total_rows == stream_rows(n, self.seq_len)
        for s in TEXT_SPLITS:
            log.info("text %s split: %d rows of %d tokens", s, self.split_size(s), self.seq_len)

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
        return self.rows[split].tokens_and_segments(index)[0]

    def example(self, split: str, index: int) -> dict:
        """inputs, targets, loss_mask, segment_ids, positions: each (T,); see packing."""
        index = check_index(index)
        if index >= self.split_size(split):
            raise IndexError(f"text {split} row {index} out of range ({self.split_size(split)} "
                             "rows)")
        try:
            return self.rows[split].example(index)
        except DataError as e:  # an unreadable record: say which row needed it
            raise DataError(f"{e}; read for text {split} row {index}") from None

    def pad_example(self) -> dict:
        return pad_example(self.seq_len, self.pad_id)

    def decode(self, ids, skip_pad: bool = True) -> str:
        return self.tokenizer.decode(ids)

    def token_bytes(self) -> np.ndarray:
        """float32 (vocab_size,): UTF-8 bytes each id stands for (bits per byte)."""
        return self.tokenizer.token_bytes()

    def token_names(self) -> list[str]:
        tok = self.tokenizer
        if tok.spec == "bytes":
            return ["<pad>", "<bos>", "<eos>"] + [f"0x{b:02x}" for b in range(256)]
        if hasattr(tok, "tok"):  # Hugging Face
            names = [tok.tok.id_to_token(i) or "" for i in range(tok.num_pieces)]
        else:
            names = [tok.sp.id_to_piece(i) for i in range(tok.num_pieces)]
        names += [""] * (tok.vocab_size - len(names))
        for i, n in ((tok.pad_id, "<pad>"), (tok.bos_id, "<bos>"), (tok.eos_id, "<eos>")):
            names[i] = n
        return names
