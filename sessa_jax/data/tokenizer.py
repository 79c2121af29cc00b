"""Tokenizers for the text task: bytes by default, SentencePiece optionally.

Byte tokenizer ids (vocab_size 259, the ByT5 layout):
    0 <pad>, 1 <bos>, 2 <eos>, byte b -> b + 3 (so 3..258).

SentencePiece: the model's own ids; ``pad``/``bos``/``eos`` are the model's if it defines them,
else new ids appended after its pieces (vocab_size grows accordingly). Needs the optional
``sentencepiece`` package; without it a clear DataError says so.

Either way the pad id is never produced by ``encode``, which packing relies on to mask padding.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from sessa_jax.data.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes, shifted by 3 to leave room for pad/bos/eos."""

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + 3
    spec = "bytes"

    def encode(self, text: str) -> np.ndarray:
        """str -> int32 (n,) ids, no bos/eos added."""
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return raw.astype(np.int32) + self.offset

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> str; special ids are dropped, invalid UTF-8 is replaced."""
        ids = np.asarray(ids).reshape(-1)
        ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
        return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file; specials it lacks are appended after its pieces."""

    def __init__(self, path: str):
        if not os.path.isfile(path):  # before the import: a typo is not a missing package
            raise DataError(f"tokenizer={path!r}: file not found (expected 'bytes' or the path "
                            "of a SentencePiece .model file)")
        try:
            import sentencepiece as spm  # optional dependency
        except ImportError:
            raise DataError(
                f"tokenizer={path!r}: a SentencePiece model needs the 'sentencepiece' package "
                "(pip install sentencepiece), or use tokenizer='bytes'"
            ) from None
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as e:  # sentencepiece raises plain RuntimeError/OSError
            raise DataError(f"tokenizer={path!r}: not a readable SentencePiece model ({e})") from e
        self.spec = os.path.abspath(path)
        n = self.sp.get_piece_size()
        extra = n
        ids = {}
        for name, got in (("pad", self.sp.pad_id()), ("bos", self.sp.bos_id()),
                          ("eos", self.sp.eos_id())):
            if got is None or got < 0:
                got, extra = extra, extra + 1
            ids[name] = int(got)
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.num_pieces = n
        self.vocab_size = extra

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)
               if 0 <= int(i) < self.num_pieces
               and int(i) not in (self.pad_id, self.bos_id, self.eos_id)]
        return self.sp.decode(ids)


def load_tokenizer(spec: str):
    """'bytes' -> ByteTokenizer; anything else is a SentencePiece model path."""
    if spec == "bytes":
        return ByteTokenizer()
    return SentencePieceTokenizer(spec)
