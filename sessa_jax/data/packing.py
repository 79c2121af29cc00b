"""Packing documents into rows at read time, with segment ids the model can respect.

A split is a list of *records* (token arrays; a long document is stored as several records, the
first flagged as its start) whose concatenation is one stream of N tokens, each document ending
with its ``<eos>``. Row r (T = seq_len) is stream[r*T : r*T + T + 1]: consecutive rows overlap
by one token so no next-token target is lost, there are ceil((N - 1) / T) rows, and the last
partial row is padded. Nothing is fixed at preparation time, so any seq_len works.

A row gives, each of shape (T,):
    inputs      int32    row[:-1]
    targets     int32    row[1:]
    segment_ids int32    1, 2, ... per document piece in the row (in order), 0 on padding
    positions   int32    position within its segment in this row (0 where a segment starts)
    loss_mask   float32  1 where the target is in the input's own segment: the last token of a
                         document predicts its <eos>, but <eos> does not predict the next document
                         (its first token is never a target), nor is padding scored.

Locating row r is a binary search over record start offsets (int64, 8 bytes per record).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from sessa_jax.data.errors import DataError


class PackedRows:
    """Rows of T+1 tokens over records given by lengths, doc-start flags and a reader.

    Args:
      lengths: int (R,) tokens per record (>= 1).
      starts_doc: bool (R,) True where a record begins a document.
      read: record index -> int array of that record's tokens.
      seq_len: T.
      pad_id: id written into padding.
      row_range: (first, stop) rows of the stream this object exposes (a split's share).
    """

    def __init__(self, lengths: np.ndarray, starts_doc: np.ndarray,
                 read: Callable[[int], np.ndarray], seq_len: int, pad_id: int,
                 row_range: tuple[int, int] | None = None):
        lengths = np.asarray(lengths, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])  # (R+1,) stream offsets
        self.starts_doc = np.asarray(starts_doc, bool)
        self.read, self.seq_len, self.pad_id = read, seq_len, pad_id
        self.total_rows = stream_rows(int(self.offsets[-1]), seq_len)
        self.first, self.stop = row_range if row_range is not None else (0, self.total_rows)

    def view(self, first: int, stop: int) -> "PackedRows":
        """The rows [first, stop) of the stream (a split), sharing the index."""
        if not 0 <= first <= stop <= self.total_rows:
            raise ValueError(f"rows [{first}, {stop}) outside [0, {self.total_rows})")
        out = object.__new__(PackedRows)
        out.__dict__.update(self.__dict__)
        out.first, out.stop = first, stop
        return out

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.stop - self.first

    def tokens_and_segments(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ``index`` of this range: (tokens, segment_ids, positions), each int32 (T+1,)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        T = self.seq_len
        lo = (self.first + index) * T
        hi = min(lo + T + 1, self.num_tokens)
        tokens = np.full(T + 1, self.pad_id, np.int32)
        seg = np.zeros(T + 1, np.int32)
        pos = np.zeros(T + 1, np.int32)
        i = int(np.searchsorted(self.offsets, lo, side="right")) - 1
        at, segment, seg_start = 0, 0, 0
        while i < len(self.starts_doc) and self.offsets[i] < hi:
            begin, end = max(lo, int(self.offsets[i])), min(hi, int(self.offsets[i + 1]))
            piece = np.asarray(self.read(i))
            if piece.size != self.offsets[i + 1] - self.offsets[i]:
                raise DataError(f"record {i}: {piece.size} tokens, the index says "
                                f"{int(self.offsets[i + 1] - self.offsets[i])}")
            if segment == 0 or self.starts_doc[i]:
                segment, seg_start = segment + 1, at
            n = end - begin
            tokens[at:at + n] = piece[begin - int(self.offsets[i]):end - int(self.offsets[i])]
            seg[at:at + n] = segment
            at += n
            pos[seg_start:at] = np.arange(at - seg_start, dtype=np.int32)
            i += 1
        return tokens, seg, pos

    def example(self, index: int) -> dict:
        """Row ``index`` as an example dict (see the module docstring)."""
        tokens, seg, pos = self.tokens_and_segments(index)
        same = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
        return {
            "inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": same.astype(np.float32),
            "segment_ids": seg[:-1], "positions": pos[:-1],
        }


def stream_rows(num_tokens: int, seq_len: int) -> int:
    """Rows of T+1 tokens (overlapping by one) a stream of num_tokens makes."""
    return max(0, -(-(num_tokens - 1) // seq_len))


def split_rows(num_rows: int, valid_fraction: float) -> tuple[int, int]:
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


def records_of(doc: np.ndarray, eos_id: int, max_tokens: int) -> list[np.ndarray]:
    """A document's tokens + <eos>, cut into records of at most ``max_tokens``.

    Cutting bounds what a row reads: a row needs at most T + 1 + max_tokens tokens from disk.
    """
    full = np.append(np.asarray(doc, np.int32), np.int32(eos_id))
    return [full[i:i + max_tokens] for i in range(0, full.size, max_tokens)]


def pad_example(seq_len: int, pad_id: int) -> dict:
    """An all-pad, unscored example with the keys of a packed row."""
    z = np.zeros(seq_len, np.int32)
    return {"inputs": np.full(seq_len, pad_id, np.int32),
            "targets": np.full(seq_len, pad_id, np.int32),
            "loss_mask": np.zeros(seq_len, np.float32), "segment_ids": z, "positions": z.copy()}


def check_lengths(lengths: Sequence[int], where: str) -> None:
    if len(lengths) and min(lengths) < 1:
        raise DataError(f"{where}: a record has no tokens (corrupted index)")
