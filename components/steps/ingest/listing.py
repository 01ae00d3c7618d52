"""List a source (a directory, a glob, an S3 prefix or a list file) in URI order, with sizes
and versions, and with listing problems (missing, unreadable) as entries rather than errors.

A :class:`Span` of URIs lists one shard of a source: only the files it holds are stat'ed (list
files), listed (S3 pages from ``StartAfter``) or walked (directories outside it are pruned).
"""

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


@dataclasses.dataclass(frozen=True)
class Span:
    """The URIs ``after < uri <= through`` of a sorted listing (``None``: unbounded that side).

    Spans that share their boundaries (one's ``through`` is the next one's ``after``) split any
    listing, even one that changed since they were planned, into disjoint shards covering it.
    """

    after: str | None = None
    through: str | None = None

    def holds(self, uri: str) -> bool:
        return not self.before(uri) and not self.past(uri)

    def before(self, uri: str) -> bool:
        return self.after is not None and uri <= self.after

    def past(self, uri: str) -> bool:
        return self.through is not None and uri > self.through

    def holds_some_under(self, folder: str) -> bool:
        """Whether any URI below ``folder`` (they all lie in ``[folder/, folder0)``) is held."""
        return not self.past(folder + "/") and not self.before(folder + "0")


EVERYTHING = Span()


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _list_file_source(src: str) -> str | None:
    """The list file's URI when ``src`` names one (``@list.txt`` or an existing ``*.txt``)."""
    if src.startswith("@"):
        return src[1:]
    if src.endswith(".txt") and storage.exists(src):
        return src
    return None


def list_source(src: str, span: Span = EVERYTHING) -> tuple[str | None, Iterator[Listed]]:
    """(root for relative caption paths, files sorted by URI) of a dir, glob, S3 prefix or list;
    with ``span``, only the files in it.

    Raises :class:`storage.StorageNotFound` when ``src`` does not exist.
    """
    root, entries = _list_source(str(src), span)
    return root, _within(entries, span)


def list_uris(src: str) -> Iterator[str]:
    """The URIs :func:`list_source` lists, in order and once each, without stat'ing list-file
    entries (what planning shards needs: no HEAD request per S3 entry, no file opened)."""
    listed = _list_file_source(str(src))
    if listed is not None:
        yield from _list_file_uris(listed)
        return
    last = None
    for entry in list_source(src)[1]:
        if entry.uri != last:
            yield entry.uri
        last = entry.uri


def _list_source(src: str, span: Span) -> tuple[str | None, Iterator[Listed]]:
    listed = _list_file_source(src)
    if listed is not None:
        return None, _list_file(listed, span)
    if storage.is_s3(src):
        if _has_magic(src):
            base = src[: min(src.find(c) for c in "*?[" if c in src)].rsplit("/", 1)[0]
            return base, (e for e in _list_s3(base, span) if fnmatch.fnmatchcase(e.uri, src))
        return src.rstrip("/"), _list_s3(src, span)
    if _has_magic(src):
        return _glob_root(src), _list_glob(src, span)
    path = os.path.abspath(storage.local_path(src))
    if os.path.isdir(path):
        return path, _walk_local(path, span=span)
    if os.path.isfile(path):
        return os.path.dirname(path), iter([_stat_local(path)])
    raise storage.StorageNotFound(
        f"source {src} does not exist; pass a directory, a glob (/data/*.mp4), "
        "s3://bucket/prefix, or @list.txt"
    )


def _within(entries: Iterator[Listed], span: Span) -> Iterator[Listed]:
    """The entries in ``span`` (the listers prune; this is exact), stopping past its end."""
    for entry in entries:
        if span.past(entry.uri):
            return
        if not span.before(entry.uri):
            yield entry


def _walk_local(
    root: str, ancestors: frozenset = frozenset(), span: Span = EVERYTHING
) -> Iterator[Listed]:
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
        if span.past(path + "/" if is_dir else path):
            return  # siblings come in URI order: the rest lie past the span too
        if is_dir:
            if span.holds_some_under(path):
                yield from _walk_local(path, ancestors, span)
        elif span.holds(path):
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


def _list_s3(prefix: str, span: Span = EVERYTHING) -> Iterator[Listed]:
    bucket, key = storage.split_s3(prefix)
    if key and not key.endswith("/"):
        single = _stat_s3(prefix)
        if single.problem is None:  # the URI names one object, not a prefix
            yield single
            return
    for info in _s3_objects(prefix, span):
        if info.uri.endswith("/"):  # "folder" placeholders made by consoles hold no data
            continue
        yield Listed(info.uri, info.size, info.version)


def _s3_objects(prefix: str, span: Span) -> Iterator[storage.ObjectInfo]:
    """Objects under ``prefix`` in key order; a shard's listing starts after its ``after`` key
    (S3 ``StartAfter``), so each shard pages through its own keys only."""
    bucket, key = storage.split_s3(prefix)
    start = storage.split_s3(span.after) if span.after and storage.is_s3(span.after) else None
    if start is None or start[0] != bucket:
        yield from storage.list_objects(prefix)
        return
    key = key.rstrip("/") + "/" if key else ""
    if start[1] < key:  # the span starts before this prefix: nothing to skip
        yield from storage.list_objects(prefix)
        return
    from botocore.exceptions import BotoCoreError, ClientError

    paginator = storage.s3_client().get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=key, StartAfter=start[1]):
            for obj in page.get("Contents", []):
                uri = f"s3://{bucket}/{obj['Key']}"
                if span.past(uri):
                    return
                yield storage.ObjectInfo(uri, obj["Size"], obj["ETag"].strip('"'))
    except (BotoCoreError, ClientError) as exc:
        raise storage.StorageError(
            f"cannot list {prefix} after {span.after}: {exc}; check the bucket, the "
            "credentials and AWS_ENDPOINT_URL"
        ) from exc


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    static = [p for p in parts[: next(i for i, p in enumerate(parts) if _has_magic(p))]]
    return os.path.abspath(os.path.join(*static)) if static else os.path.abspath(".")


def _list_glob(pattern: str, span: Span = EVERYTHING) -> Iterator[Listed]:
    entries: list[Listed] = []
    for match in glob.glob(pattern, recursive=True):
        path = os.path.abspath(match)
        if os.path.isdir(path):
            if span.holds_some_under(path):
                entries.extend(_walk_local(path, span=span))
        elif span.holds(path):
            entries.append(_stat_local(path))
    yield from sorted({e.uri: e for e in entries}.values(), key=lambda e: e.uri)


def _list_file(uri: str, span: Span = EVERYTHING) -> Iterator[Listed]:
    """Entries of a list file in ``span``: only those are stat'ed (HEAD on S3)."""
    for item in _list_file_uris(uri):
        if span.past(item):
            return
        if not span.before(item):
            yield _stat_s3(item) if storage.is_s3(item) else _stat_local(item)


def _list_file_uris(uri: str) -> list[str]:
    """Sorted, distinct URIs of a list file; relative ones resolve against its own folder."""
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
    return sorted(uris)
