"""Input files -> documents: text files, JSONL (a named field) and Parquet (a named column).

``expand_paths`` turns paths and globs (local, ``**`` recursive; or cloud, ``gs://...`` through
``etils.epath``, which needs gcsfs) into a sorted, de-duplicated list of files. ``read_documents(path, ...)`` yields one file's documents as
``str``, streaming (a file is never held whole in memory, except a text file that is itself one
document):

- text, ``document='file'``: the whole file is one document;
- text, ``document='line'``: every non-blank line is one document;
- JSONL: every non-blank line is a JSON object whose ``field`` is one document (a string);
- Parquet: every row's ``field`` column is one document (null rows are counted, not read).

Bad input raises :class:`BadFile` (a DataError) naming the file and the problem: missing,
unreadable, empty, binary (a NUL byte), not UTF-8 (with byte offset), malformed JSONL (line
number) or Parquet (unreadable, column missing or not text). ``check_file`` makes one cheap
streaming pass so that a file can be skipped whole before any of it is used.
"""

from __future__ import annotations

import codecs
import glob as _glob
import json
import os
from typing import Iterable, Iterator, Optional


from sessa_jax.data.errors import DataError
from sessa_jax.paths import PathError, is_local, user_path

FORMATS = ("auto", "text", "jsonl", "parquet")
DOCUMENT_UNITS = ("file", "line")
_READ_BYTES = 1 << 20  # streaming block size
_PARQUET_BATCH = 1024  # rows per Parquet read


class BadFile(DataError):
    """One input file is unusable; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def file_format(path: str, fmt: str = "auto") -> str:
    """'text' | 'jsonl' | 'parquet' for a file: ``fmt`` unless 'auto', else by extension."""
    if fmt != "auto":
        return fmt
    name = str(path).lower()
    for suffix in (".gz", ".zst"):
        if name.endswith(suffix):
            raise BadFile(str(path), f"compressed input ({suffix}) is not supported: decompress it")
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    return "text"


def _glob_split(pattern: str) -> tuple[str, str]:
    """'gs://b/dir/x*/*.txt' -> ('gs://b/dir', 'x*/*.txt'): the literal base and the glob."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if _glob.has_magic(part):
            return "/".join(parts[:i]) or ("/" if pattern.startswith("/") else "."), \
                "/".join(parts[i:])
    return pattern, ""


def _glob_files(pattern: str) -> list[str]:
    """Sorted files matching a glob: local (``~`` expanded, absolute) with ``**`` (recursive),
    cloud through epath."""
    if is_local(pattern):
        local = str(user_path(pattern))
        return sorted(p for p in _glob.glob(local, recursive=True) if os.path.isfile(p))
    base, rest = _glob_split(pattern)  # epath globs below a literal base ('**' not on GCS)
    return sorted(str(p) for p in user_path(base).glob(rest) if p.is_file())


def expand_paths(patterns: Iterable[str]) -> tuple[list[str], list[dict]]:
    """(files in order without duplicates, problems [{"path", "reason"}]) for paths and globs.

    A glob's matches are sorted; a glob matching nothing, a missing path and a directory are
    problems (the caller raises or skips them as configured). Files are named as
    :func:`sessa_jax.paths.user_path` resolves them: URIs as given, local paths absolute.
    """
    files, problems = [], []
    for pattern in patterns:
        try:
            p = user_path(pattern)
        except PathError as e:
            problems.append({"path": pattern, "reason": str(e).split(": ", 1)[-1]})
            continue
        if _glob.has_magic(pattern):
            try:
                matches = _glob_files(pattern)
            except Exception as e:  # unreachable bucket, permissions, '**' on a bucket
                problems.append({"path": pattern, "reason": f"cannot list ({e})"})
                continue
            if not matches:
                problems.append({"path": pattern, "reason": "glob matched no files"})
            files.extend(matches)
            continue
        if p.is_dir():
            problems.append({"path": pattern, "reason": "is a directory without meta.json: "
                             "pass a glob such as DIR/*.txt, or a prepared directory"})
        elif not p.exists():
            problems.append({"path": pattern, "reason": "file not found"})
        else:
            files.append(str(p))
    return list(dict.fromkeys(files)), problems


def _blocks(path: str) -> Iterator[bytes]:
    try:
        with user_path(path).open("rb") as f:
            while True:
                block = f.read(_READ_BYTES)
                if not block:
                    return
                yield block
    except OSError as e:
        raise BadFile(path, f"cannot read ({e.strerror or e})") from None


def _text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its newline), decoding UTF-8 as it streams.

    Raises BadFile on a NUL byte (binary) or invalid UTF-8, with the byte offset.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, pending, number = 0, "", 0
    for block in _blocks(path):
        nul = block.find(b"\0")
        if nul >= 0:
            raise BadFile(path, f"binary file (NUL byte at offset {offset + nul})")
        held = decoder.getstate()[0]  # bytes of a character begun in the previous block
        try:
            text = decoder.decode(block)
        except UnicodeDecodeError as e:  # e.start counts from the held bytes
            data = held + block
            raise BadFile(path, f"not valid UTF-8 at byte offset {offset - len(held) + e.start} "
                          f"(byte 0x{data[e.start]:02x}: {e.reason})") from None
        offset += len(block)
        if number == 0 and not pending:
            text = text.removeprefix("\ufeff")  # a byte order mark is not content
        lines = (pending + text).split("\n")
        pending = lines.pop()
        for line in lines:
            number += 1
            yield number, line
    held = decoder.getstate()[0]
    try:
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise BadFile(path, f"not valid UTF-8 at byte offset {offset - len(held)} (truncated "
                      "character at the end of the file)") from None
    if pending:
        yield number + 1, pending


def _text_document(path: str) -> str:
    return "\n".join(line for _, line in _text_lines(path))


def _jsonl_documents(path: str, field: str) -> Iterator[str]:
    for number, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadFile(path, f"line {number}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise BadFile(path, f"line {number}: expected a JSON object, got "
                          f"{type(record).__name__}")
        if field not in record:
            raise BadFile(path, f"line {number}: no field {field!r} (has "
                          f"{', '.join(map(repr, list(record)[:5]))}); set data.text.field")
        value = record[field]
        if not isinstance(value, str):
            raise BadFile(path, f"line {number}: field {field!r} is "
                          f"{type(value).__name__}, expected a string")
        yield value


def _parquet_file(path: str, field: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs the 'pyarrow' package "
                        "(pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(user_path(path).open("rb"))
    except Exception as e:  # pyarrow.ArrowInvalid and friends
        raise BadFile(path, f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise BadFile(path, f"no column {field!r} (has {', '.join(map(repr, names[:5]))}); "
                      "set data.text.field")
    import pyarrow as pa
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise BadFile(path, f"column {field!r} is {kind}, expected a string column")
    return pf


def _parquet_documents(path: str, field: str) -> Iterator[Optional[str]]:
    pf = _parquet_file(path, field)
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[field]):
            yield from batch.column(0).to_pylist()
    except BadFile:
        raise
    except Exception as e:  # a corrupt page deep in the file
        raise BadFile(path, f"corrupt Parquet data ({str(e).splitlines()[0]})") from None


def read_documents(path: str, fmt: str = "auto", field: str = "text",
                   document: str = "file") -> Iterator[str]:
    """One file's documents, in order; blank documents (and Parquet nulls) are left out."""
    kind = file_format(path, fmt)
    if kind == "text" and document == "file":
        doc = _text_document(path)
        if doc.strip():
            yield doc
        return
    if kind == "text":
        docs = (line for _, line in _text_lines(path))
    elif kind == "jsonl":
        docs = _jsonl_documents(path, field)
    else:
        docs = _parquet_documents(path, field)
    for doc in docs:
        if doc is not None and doc.strip():
            yield doc


def check_file(path: str, fmt: str = "auto", field: str = "text",
               document: str = "file") -> None:
    """Raise BadFile if the file is unusable; streams it once, keeping nothing.

    Parquet is checked by its footer and schema only (its pages are checksummed on read).
    """
    kind = file_format(path, fmt)
    if kind == "parquet":
        if _parquet_file(path, field).metadata.num_rows == 0:
            raise BadFile(path, "empty file (0 rows)")
        return
    size, content = 0, False
    if kind == "jsonl":
        for _ in _jsonl_documents(path, field):
            content = True
    else:
        for _, line in _text_lines(path):
            content = content or bool(line.strip())
    if not content:
        size = user_path(path).stat().length
        raise BadFile(path, "empty file (0 bytes)" if size == 0 else
                      f"empty file (only whitespace, {size} bytes)")
