"""Tokenizers for the text task: bytes, Hugging Face ``tokenizer.json``, or SentencePiece.

``data.text.tokenizer`` chooses: ``"bytes"``; a path ending in ``.json`` (a Hugging Face
``tokenizers`` file: BPE, WordPiece or Unigram; local or gs:// through ``etils.epath``); anything
else is a SentencePiece ``.model``.

Byte tokenizer ids (vocab_size 259, the ByT5 layout):
    0 <pad>, 1 <bos>, 2 <eos>, byte b -> b + 3 (so 3..258).

SentencePiece: the model's own ids; ``pad``/``bos``/``eos`` are the model's if it defines them,
else new ids appended after its pieces (vocab_size grows accordingly). Needs the optional
``sentencepiece`` package; without it a clear DataError says so.

Hugging Face: the file's own ids; ``<pad>``/``<bos>``/``<eos>`` (or the usual aliases, e.g.
``</s>``, ``<|endoftext|>``, ``[PAD]``) are the file's if it has them, else appended after its
vocabulary. ``sha256`` of the file lets a prepared corpus check it was made with the same one.

Every tokenizer has ``encode``, ``encode_batch``, ``decode``, ``vocab_size``, special ids, ``spec``
and ``token_bytes()`` (UTF-8 bytes each id stands for, for bits per byte). The model's vocabulary
is ``padded_vocab(tokenizer.vocab_size)``: a multiple of 128 (fast matmuls, even sharding).
"""

from __future__ import annotations

import hashlib
import json
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

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> str; special ids are dropped, invalid UTF-8 is replaced."""
        ids = np.asarray(ids).reshape(-1)
        ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
        return (ids - self.offset).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """float32 (vocab_size,): 1 per byte id, 0 for specials."""
        table = np.zeros(self.vocab_size, np.float32)
        table[self.offset:] = 1.0
        return table


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file; specials it lacks are appended after its pieces."""

    def __init__(self, path: str):
        from sessa_jax.paths import user_path

        try:
            found = user_path(path).is_file()
        except Exception:  # an unknown URI scheme, an unreachable bucket
            found = False
        if not found:  # before the import: a typo is not a missing package
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
            # local or a URI: SentencePiece reads the serialized model from memory
            self.sp = spm.SentencePieceProcessor(model_proto=user_path(path).read_bytes())
        except Exception as e:  # sentencepiece raises plain RuntimeError/OSError
            raise DataError(f"tokenizer={path!r}: not a readable SentencePiece model ({e})") from e
        self.spec = path  # ids are identified by the file's sha256 (fingerprint), not its path
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

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(x, dtype=np.int32) for x in self.sp.encode(list(texts))]

    def token_bytes(self) -> np.ndarray:
        """float32 (vocab_size,): UTF-8 length of each piece ('\u2581' as a space), specials 0."""
        sp, table = self.sp, np.zeros(self.vocab_size, np.float32)
        for i in range(self.num_pieces):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            table[i] = 1.0 if sp.is_byte(i) else len(
                sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return table

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)
               if 0 <= int(i) < self.num_pieces
               and int(i) not in (self.pad_id, self.bos_id, self.eos_id)]
        return self.sp.decode(ids)


# Names a tokenizer.json may give its specials, most specific first.
_SPECIAL_NAMES = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "bos": ("<bos>", "<s>", "[CLS]", "<|startoftext|>", "<|begin_of_text|>"),
    "eos": ("<eos>", "</s>", "[SEP]", "<|endoftext|>", "<|end_of_text|>"),
}


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


class HFTokenizer:
    """A Hugging Face ``tokenizers`` file (``tokenizer.json``); specials it lacks are appended."""

    def __init__(self, path: str):
        import tokenizers

        from sessa_jax.paths import user_path

        try:
            raw = user_path(path).read_text(encoding="utf-8")
        except Exception as e:  # FileNotFoundError, PermissionError, gcs errors, bad UTF-8
            raise DataError(f"tokenizer={path!r}: cannot read the tokenizer file "
                            f"({_first_line(e)})") from None
        try:
            self.tok = tokenizers.Tokenizer.from_str(raw)
            decoder = (json.loads(raw).get("decoder") or {}).get("type")
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON/schema
            raise DataError(f"tokenizer={path!r}: not a Hugging Face tokenizer.json "
                            f"({_first_line(e)})") from None
        self.spec = path
        self.sha256 = hashlib.sha256(raw.encode("utf-8")).hexdigest()
        self.byte_level = decoder == "ByteLevel"  # every character of a token is one byte
        vocab = self.tok.get_vocab(with_added_tokens=True)
        n = extra = self.tok.get_vocab_size(with_added_tokens=True)
        ids = {}
        for name, names in _SPECIAL_NAMES.items():
            got = next((vocab[x] for x in names if x in vocab), None)
            if got is None:
                got, extra = extra, extra + 1
            ids[name] = int(got)
        self.pad_id, self.bos_id, self.eos_id = ids["pad"], ids["bos"], ids["eos"]
        self.num_pieces = n
        self.vocab_size = extra

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in out]

    def decode(self, ids: Sequence[int]) -> str:
        special = (self.pad_id, self.bos_id, self.eos_id)
        ids = [int(i) for i in np.asarray(ids).reshape(-1)
               if 0 <= int(i) < self.num_pieces and int(i) not in special]
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """float32 (vocab_size,): bytes of text each id stands for; specials/added tokens 0."""
        table = np.zeros(self.vocab_size, np.float32)
        added = {int(i) for i in self.tok.get_added_tokens_decoder()}
        for piece, i in self.tok.get_vocab(with_added_tokens=False).items():
            if i in added or i >= self.vocab_size:
                continue
            # ByteLevel maps each byte to one printable character; otherwise decode the piece.
            table[i] = len(piece) if self.byte_level else len(
                self.tok.decode([i]).encode("utf-8"))
        for i in (self.pad_id, self.bos_id, self.eos_id):
            table[i] = 0.0
        return table


def is_hf_spec(spec: str) -> bool:
    return spec.endswith(".json")


def load_tokenizer(spec: str):
    """'bytes' -> ByteTokenizer; '*.json' -> HFTokenizer; else a SentencePiece model path."""
    if spec == "bytes":
        return ByteTokenizer()
    if is_hf_spec(spec):
        return HFTokenizer(spec)
    return SentencePieceTokenizer(spec)


def fingerprint(tok) -> str:
    """What identifies a tokenizer's ids: 'bytes' or the sha256 of its file."""
    if tok.spec == "bytes":
        return "bytes"
    if getattr(tok, "sha256", None) is None:
        from sessa_jax.paths import user_path
        tok.sha256 = hashlib.sha256(user_path(tok.spec).read_bytes()).hexdigest()
    return tok.sha256


VOCAB_MULTIPLE = 128


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The model's vocabulary for a tokenizer of n ids: n rounded up to a multiple of 128."""
    return -(-n // multiple) * multiple
