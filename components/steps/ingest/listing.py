"""List a source (a directory, a glob, an S3 prefix or a list file) in URI order, with sizes
and versions, and with listing problems (missing, unreadable) as entries rather than errors."""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from components.core import storage
from components.steps.ingest.probe import error_text

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class Listed:
    """One file of the source, as listed (``problem`` when listing already found it bad)."""

    uri: str
    size: int | None
    version: str  # mtime_ns locally, ETag on S3 (as storage.ObjectInfo)
    problem: tuple[str, str] | None = None  # (reason, detail)

    @property
    def source_version(self) -> str | None:
        return f"{self.size}:{self.version}" if self.size is not None else None


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def list_source(src: str) -> tuple[str | None, Iterator[Listed]]:
    """(root for relative caption paths, files sorted by URI) of a dir, glob, S3 prefix or list.

    Raises :class:`storage.StorageNotFound` when ``src`` does not exist.
    """
    src = str(src)
    if src.startswith("@"):
        return None, _list_file(src[1:])
    if src.endswith(".txt") and storage.exists(src):
        return None, _list_file(src)
    if storage.is_s3(src):
        if _has_magic(src):
            base = src[: min(src.find(c) for c in "*?[" if c in src)].rsplit("/", 1)[0]
            return base, (e for e in _list_s3(base) if fnmatch.fnmatchcase(e.uri, src))
        return src.rstrip("/"), _list_s3(src)
    if _has_magic(src):
        return _glob_root(src), _list_glob(src)
    path = os.path.abspath(storage.local_path(src))
    if os.path.isdir(path):
        return path, _walk_local(path)
    if os.path.isfile(path):
        return os.path.dirname(path), iter([_stat_local(path)])
    raise storage.StorageNotFound(
        f"source {src} does not exist; pass a directory, a glob (/data/*.mp4), "
        "s3://bucket/prefix, or @list.txt"
    )


def _walk_local(root: str, ancestors: frozenset = frozenset()) -> Iterator[Listed]:
    """Files under ``root`` in URI order: siblings sorted with ``/`` after directory names.

    Unlike ``os.walk`` nothing is dropped silently: unlistable directories, broken links and
    special files come out as entries with a problem. Symlinked directories are followed
    unless they loop back to an ancestor.
    """
    try:
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in ancestors:
            log.warning("ingest: %s links back to a parent directory; not followed", root)
            return
        with os.scandir(root) as it:
            entries = list(it)
    except OSError as exc:
        detail = f"cannot list this directory ({error_text(exc)})"
        yield Listed(root + "/", None, "", ("unreadable", detail))
        return
    ancestors = ancestors | {(st.st_dev, st.st_ino)}
    keyed = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        keyed.append((entry.name + "/" if is_dir else entry.name, entry.path, is_dir))
    for _, path, is_dir in sorted(keyed):
        if is_dir:
            yield from _walk_local(path, ancestors)
        else:
            yield _stat_local(path)


def _stat_local(path: str) -> Listed:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        what = "broken symlink" if os.path.islink(path) else "no such file"
        return Listed(path, None, "", ("missing", what))
    except OSError as exc:
        return Listed(path, None, "", ("unreadable", error_text(exc)))
    if stat.S_ISDIR(st.st_mode):
        return Listed(path, None, "", ("unreadable", "it is a directory; list files, not folders"))
    if not stat.S_ISREG(st.st_mode):
        return Listed(path, None, "", ("unreadable", "not a regular file"))
    return Listed(path, st.st_size, str(st.st_mtime_ns))


def _stat_s3(uri: str) -> Listed:
    from botocore.exceptions import ClientError

    bucket, key = storage.split_s3(uri)
    try:
        head = storage.s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            return Listed(uri, None, "", ("missing", "no such object"))
        return Listed(uri, None, "", ("unreadable", f"HEAD failed: {code or exc}"))
    return Listed(uri, head["ContentLength"], head["ETag"].strip('"'))


def _list_s3(prefix: str) -> Iterator[Listed]:
    bucket, key = storage.split_s3(prefix)
    if key and not key.endswith("/"):
        single = _stat_s3(prefix)
        if single.problem is None:  # the URI names one object, not a prefix
            yield single
            return
    for info in storage.list_objects(prefix):
        if info.uri.endswith("/"):  # "folder" placeholders made by consoles hold no data
            continue
        yield Listed(info.uri, info.size, info.version)


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    static = [p for p in parts[: next(i for i, p in enumerate(parts) if _has_magic(p))]]
    return os.path.abspath(os.path.join(*static)) if static else os.path.abspath(".")


def _list_glob(pattern: str) -> Iterator[Listed]:
    entries: list[Listed] = []
    for match in glob.glob(pattern, recursive=True):
        path = os.path.abspath(match)
        entries.extend(_walk_local(path) if os.path.isdir(path) else [_stat_local(path)])
    yield from sorted({e.uri: e for e in entries}.values(), key=lambda e: e.uri)


def _list_file(uri: str) -> Iterator[Listed]:
    """Entries of a list file; relative ones resolve against the list's own folder."""
    base = uri.rsplit("/", 1)[0] if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))
    uris = set()
    for line in storage.read_text(uri).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if storage.is_s3(line):
            uris.add(line)
        elif storage.is_s3(base):
            uris.add(storage.join(base, line))
        else:
            uris.add(os.path.abspath(os.path.join(base, str(storage.local_path(line)))))
    for item in sorted(uris):
        yield _stat_s3(item) if storage.is_s3(item) else _stat_local(item)
