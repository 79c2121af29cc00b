"""User paths and URIs: the one place a path given by a user becomes an ``etils.epath.Path``.

Run directories, checkpoints, metrics, TensorBoard logs, data and exports may live on a local
disk or in an object store (``gs://bucket/run``; also ``s3://``, ``az://``, ``hf://``: the
schemes ``etils.epath`` knows, through fsspec). :func:`user_path` keeps a URI exactly as given
(``os.path.abspath("gs://b/run")`` would make it ``<cwd>/gs:/b/run``: on a pod every host would
then write its own local, unrestorable copy) and makes a local path absolute with ``~``
expanded. An unknown scheme (``memory://x``) is an error, never a local directory named
``memory:``.

Object stores cannot append to or rename a file atomically; :func:`write_text` and
:func:`append_text` do the right thing on both kinds.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
SCHEMES = ("gs", "s3", "az", "hf")  # what etils.epath resolves (gpath._URI_SCHEMES)


class PathError(ValueError):
    """A path that cannot be used (an unknown URI scheme)."""


def scheme(path: PathLike) -> str | None:
    """'gs' for 'gs://b/x', None for a local path."""
    m = _SCHEME.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_local(path: PathLike) -> bool:
    return scheme(path) in (None, "file")


def user_path(path: PathLike) -> epath.Path:
    """A path or URI given by a user -> ``epath.Path``.

    ``gs://bucket/run`` stays ``gs://bucket/run``; ``file:///x`` is the local ``/x``;
    ``~/runs/a`` and ``runs/a`` become absolute local paths. Raises PathError for a scheme that
    etils.epath does not support (it would silently become a local directory).
    """
    if isinstance(path, epath.Path) and not is_local(os.fspath(path)):
        return path
    text = os.fspath(path)
    s = scheme(text)
    if s == "file":
        text = text[len("file://"):]
        s = None
    if s is None:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if s not in SCHEMES:
        raise PathError(f"{text}: unsupported URI scheme {s}:// (supported: local paths, "
                        + ", ".join(f"{x}://" for x in SCHEMES) + ")")
    return epath.Path(text)


def write_text(path: PathLike, text: str) -> None:
    """Replace ``path``'s content: atomically on a local disk (temporary file, then rename);
    one object write on an object store (which is atomic there)."""
    p = user_path(path)
    if not is_local(p):
        p.write_text(text, encoding="utf-8")
        return
    tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)


def append_text(path: PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (created when missing). Object stores cannot append: there
    the file is read and written whole (fine for small files; see MetricsWriter for a log)."""
    p = user_path(path)
    if is_local(p):
        with open(p, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
        return
    old = p.read_text(encoding="utf-8") if p.exists() else ""
    p.write_text(old + text, encoding="utf-8")


@contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local file path holding ``path``'s bytes (itself when local; else a temporary copy),
    for readers that only open local files (safetensors' memory map)."""
    p = user_path(path)
    if is_local(p):
        yield os.fspath(p)
        return
    d = tempfile.mkdtemp(prefix="sessa-")
    try:
        dst = os.path.join(d, p.name)
        with p.open("rb") as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        yield dst
    finally:
        shutil.rmtree(d, ignore_errors=True)


def copy_tree(local_dir: PathLike, dst: PathLike) -> None:
    """Copy a local directory's files under ``dst`` (local or an object store)."""
    root, out = os.fspath(local_dir), user_path(dst)
    for d, _, files in os.walk(root):
        rel = os.path.relpath(d, root)
        target = out if rel == "." else out / rel
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            with open(os.path.join(d, name), "rb") as src, (target / name).open("wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
