"""Ingest: list raw files, hash and probe each, write ``manifest.parquet`` + ``quarantine.parquet``.

``tessera ingest SRC``. ``SRC`` is a local directory, a glob (``/data/*.mp4``), an
``s3://bucket/prefix`` (or an S3 glob, where ``*`` also crosses ``/``), or a list file
(``@list.txt``, or any ``.txt`` file: one URI per line, ``#`` comments, paths relative to the list).

Every file seen ends in exactly one of the two tables (``seen == ingested + quarantined`` is
checked): a clip passes when it has a decodable video stream inside the ``ingest`` bounds and is
not a byte-for-byte copy of a clip already accepted; anything else gets a quarantine row with a
reason from :data:`components.core.manifest.REASONS` and a message saying what to do.

**In parts.** :func:`plan_shards` cuts the source's sorted listing into shards of
``ingest.shard_size`` files without opening any: each shard is a span of URIs (``after < uri <=
through``), so a part lists exactly its own files (S3 pages from ``StartAfter``, list-file
entries stat'ed only in the span) and spans planned together cover every file once, even if the
source changed since. :func:`ingest_shard` probes one shard into its own tables (one committed
part; Airflow maps it), and :func:`run` merges the shards in URI order into one manifest and
one quarantine, deciding duplicates (across shards too) and joining captions there, by the same
rules as one pass: the tables are byte-identical to a single pass's, which *is* the merge of one
shard spanning the whole source. ``tessera ingest`` runs plan, parts and merge in one process.

Determinism and memory: the listing is produced in URI order (local trees are walked so that
the walk order *is* the string order of the paths; S3 lists keys in that order; globs and list
files are sorted in memory), files are processed on a process pool with a bounded window of
futures and their results are consumed in submission order, so both tables come out sorted by
URI without a global sort, a row group at a time. Re-running on the same input writes
byte-identical tables. What grows with the corpus: the sha256 -> URI map used for duplicate
detection (~150 bytes a clip) and the captions table, if one is given.

Incremental re-runs: with ``previous`` (by default the latest committed ingest in the store),
files whose ``(uri, source_version)`` did not change are not fetched, hashed or probed again;
their probe results are copied and the bounds, duplicate check, split and captions re-applied,
so the output is the same as a fresh run. The previous tables are merge-joined in URI order
alongside the listing (flat memory; each shard reads them up to the end of its span).

Timings: ``hash_s`` / ``probe_s`` / ``fetch_s`` are summed over files (worker seconds),
``shards_wall_s`` over shards, ``wall_s`` is this call's elapsed time.
Bounded per file: probing runs in worker processes; a file that takes longer than
``ingest.file_timeout_s`` has its worker killed and is quarantined (``probe_timeout``), and a
file that crashes FFmpeg (the pool breaks) is found by probing each file that was in flight
alone, then quarantined (``probe_crashed``); the rest are probed as usual. Known limit: list
files of S3 URIs are stat'ed with one HEAD request per entry, serially (per shard: shards run
in parallel).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import os
import sys
import tempfile
import time
import types
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.core import manifest as mf
from components.core import runner, storage
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec
from components.steps.ingest.listing import Listed, Span, list_source, list_uris
from components.steps.ingest.probe import (
    PROBE_FIELDS,
    bounds_violation,
    inspect_file,
    quarantine_message,
    split_of,
)

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.parquet"
MAX_PRINTED = 20  # quarantine messages printed one by one; the rest are only in the table
INFLIGHT_PER_WORKER = 4  # futures in flight per worker: keeps workers busy, memory bounded

# Quarantine reasons that depend only on the file's bytes: reused as-is from a previous run.
# Bounds-based ones depend on the config, unreadable/missing may have been fixed since, and
# unsupported_codec depends on the FFmpeg build: those files are probed again.
REUSABLE_REASONS = frozenset(
    {"zero_bytes", "not_media", "corrupt", "no_video_stream", "undecodable"}
)
# Reasons given to files that probed fine: one pass checks such a file for a duplicate first,
# so the merge turns them into duplicates of a clip accepted in an earlier shard.
BOUNDS_REASONS = frozenset({"too_short", "too_long", "resolution_out_of_bounds"})


def duplicate_detail(sha256: str, first_uri: str) -> str:
    return f"same sha256 {sha256[:12]}... as {first_uri}"


# --------------------------------------------------------------------------- captions


class Captions:
    """Given captions (Parquet: ``path``, ``caption`` [, ``short_caption``, ``caption_source``]).

    ``path`` may be the full URI, the path relative to the source root, or the bare file name;
    they are tried in that order.
    """

    def __init__(self, uri: str):
        table = mf.read_table(uri)
        missing = {"path", "caption"} - set(table.column_names)
        if missing:
            raise ValueError(
                f"captions {uri} lacks column(s) {sorted(missing)}; it needs path, caption "
                f"and optionally short_caption, caption_source (has {table.column_names})"
            )
        n = table.num_rows
        column = {
            name: table.column(name).to_pylist() if name in table.column_names else [None] * n
            for name in ("path", "caption", "short_caption", "caption_source")
        }
        self._by_path: dict[str, tuple[str | None, str | None, str | None]] = {}
        for i in range(n):
            path, caption = column["path"][i], column["caption"][i]
            key = str(path).replace("\\", "/").removeprefix("./")
            if key in self._by_path:
                raise ValueError(
                    f"captions {uri}: path {path!r} appears twice; keep one row per file"
                )
            source = column["caption_source"][i] or ("given" if caption is not None else None)
            if source is not None and source not in mf.CAPTION_SOURCES:
                raise ValueError(
                    f"captions {uri}: caption_source {source!r} for {path!r} is not one of "
                    f"{list(mf.CAPTION_SOURCES)}"
                )
            self._by_path[key] = (
                caption,
                column["short_caption"][i],
                source if caption is not None else None,
            )
        self._used: set[str] = set()

    def lookup(self, uri: str, root: str | None) -> tuple[str | None, str | None, str | None]:
        """(caption, short_caption, caption_source) of a file; all None when it has none."""
        keys = [uri]
        if root and uri.startswith(root.rstrip("/") + "/"):
            keys.append(uri[len(root.rstrip("/")) + 1 :])
        keys.append(uri.rsplit("/", 1)[-1])
        for key in keys:
            if key in self._by_path:
                self._used.add(key)
                return self._by_path[key]
        return None, None, None

    def unmatched(self) -> list[str]:
        return sorted(set(self._by_path) - self._used)


# --------------------------------------------------------------------------- previous run


class Previous:
    """Rows of a previous ingest, merge-joined in URI order with the (sorted) listing."""

    def __init__(self, manifest_path: Path, quarantine_path: Path | None, batch_rows: int):
        streams = [self._rows(manifest_path, "manifest", mf.MANIFEST_SCHEMA, batch_rows)]
        if quarantine_path is not None:
            streams.append(
                self._rows(quarantine_path, "quarantine", mf.QUARANTINE_SCHEMA, batch_rows)
            )
        self._rows_iter = heapq.merge(*streams, key=lambda r: r[0])
        self._head = next(self._rows_iter, None)

    @staticmethod
    def _rows(path: Path, kind: str, schema: pa.Schema, batch_rows: int) -> Iterator[tuple]:
        parquet = pq.ParquetFile(path)
        missing = set(schema.names) - set(parquet.schema_arrow.names)
        if missing:
            log.warning(
                "ingest: previous %s %s lacks %s; nothing reused from it",
                kind,
                path,
                sorted(missing),
            )
            return
        last = ""
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=schema.names):
            for row in batch.to_pylist():
                if row["uri"] < last:
                    log.warning(
                        "ingest: previous %s %s is not sorted by uri; reuse stops at %s",
                        kind,
                        path,
                        row["uri"],
                    )
                    return
                last = row["uri"]
                yield row["uri"], kind, row

    def pop(self, uri: str) -> tuple[str, dict] | None:
        """The previous (kind, row) for ``uri``; call with increasing URIs."""
        while self._head is not None and self._head[0] < uri:
            self._head = next(self._rows_iter, None)
        if self._head is None or self._head[0] != uri:
            return None
        _, kind, row = self._head
        self._head = next(self._rows_iter, None)
        return kind, row


def _open_previous(
    cfg: TesseraConfig, previous: str | None, stack: contextlib.ExitStack
) -> Previous | None:
    if previous == "":
        return None
    if previous is None:
        latest = runner.latest_outputs(cfg, "ingest") or {}
        manifest_uri, quarantine_uri = latest.get("manifest"), latest.get("quarantine")
        if not manifest_uri or not storage.exists(manifest_uri):
            return None
    else:
        manifest_uri = previous
        quarantine_uri = storage.join(manifest_uri.rsplit("/", 1)[0], QUARANTINE_FILE)
        if not storage.exists(manifest_uri):
            raise storage.StorageNotFound(
                f"previous manifest {manifest_uri} does not exist; pass the manifest.parquet "
                "of an earlier ingest, or previous='' to probe every file again"
            )
    manifest_path = stack.enter_context(storage.local_copy(manifest_uri))
    quarantine_path = None
    if quarantine_uri and storage.exists(quarantine_uri):
        quarantine_path = stack.enter_context(storage.local_copy(quarantine_uri))
    print(f"ingest: reusing unchanged files' probes from {manifest_uri}")
    return Previous(manifest_path, quarantine_path, cfg.ingest.row_group_size)


# --------------------------------------------------------------------------- probing a listing


class _TableWriter:
    """Rows -> Parquet, one row group per ``row_group_size`` rows (flat memory, stable bytes)."""

    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int):
        self.schema, self.row_group_size, self.rows = schema, row_group_size, 0
        self._buffer: list[dict] = []
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")

    def add(self, row: dict) -> None:
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            table = pa.Table.from_pylist(self._buffer, schema=self.schema)
            self._writer.write_table(table, row_group_size=self.row_group_size)
            self._buffer = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


@dataclasses.dataclass
class _Job:
    entry: Listed
    outcome: dict[str, Any] | None = None  # known at once (listing problem, in-process probe)
    future: Future | None = None  # probing in a pool worker
    previous: tuple[str, dict] | None = None  # reusable row of the previous run

    def done(self) -> bool:
        return self.future is None or self.future.done()


def _spawn_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of spawned workers (not forked: the parent holds boto3 connections and FFmpeg
    state). Submit to it with ``_probe_in``."""
    import multiprocessing

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _probe_in(pool: ProcessPoolExecutor, uri: str) -> Future:
    """Submit one probe. Workers start during a submit, and a spawned worker re-runs the parent's
    main script unless ``__main__`` names none; under Airflow's task runner that script is
    ``airflow``, whose import fails in a child (the task supervisor blanks the database URL), so
    each worker starts under a bare ``__main__``: it needs only ``inspect_file``."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        return pool.submit(inspect_file, uri)
    finally:
        sys.modules["__main__"] = main


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's worker processes (a hung probe cannot be cancelled); the pool breaks."""
    for proc in list(getattr(pool, "_processes", {}).values()):
        proc.kill()


class _Ingest:
    """Turns listed files into manifest and quarantine rows, in listing order."""

    def __init__(self, cfg: TesseraConfig, workdir: Path, previous: Previous | None):
        self.bounds = cfg.ingest
        self.previous = previous
        workers = cfg.ingest.workers if cfg.ingest.workers > 0 else os.cpu_count() or 1
        self.workers = workers
        self.timeout_s = cfg.ingest.file_timeout_s or None
        self.in_process = workers == 1 and self.timeout_s is None
        self.max_in_flight = INFLIGHT_PER_WORKER * workers
        self._pool: ProcessPoolExecutor | None = None
        self.manifest = _TableWriter(
            workdir / MANIFEST_FILE, mf.MANIFEST_SCHEMA, cfg.ingest.row_group_size
        )
        self.quarantine = _TableWriter(
            workdir / QUARANTINE_FILE, mf.QUARANTINE_SCHEMA, cfg.ingest.row_group_size
        )
        self.accepted: dict[bytes, str] = {}  # sha256 digest -> first URI, for duplicates
        self.reasons: Counter[str] = Counter()
        self.seen = self.reused = 0
        self.timings: Counter[str] = Counter()
        self.bytes_read = 0

    # -- submission (listing order)

    def start(self, entry: Listed) -> _Job:
        job = _Job(entry)
        hit = self.previous.pop(entry.uri) if self.previous is not None else None
        if entry.problem is not None:
            reason, detail = entry.problem
            job.outcome = {"reason": reason, "detail": detail, "bytes": entry.size}
        elif entry.size == 0:
            job.outcome = {"reason": "zero_bytes", "detail": "0 bytes", "bytes": 0}
        elif hit is not None and self._reusable(hit, entry):
            job.previous = hit
        elif self.in_process:
            job.outcome = inspect_file(entry.uri)
        else:
            job.future = self._submit(entry.uri)
        return job

    def _submit(self, uri: str) -> Future:
        try:
            return _probe_in(self.pool(), uri)
        except BrokenProcessPool:  # a file in flight crashed it: finish() isolates that one
            self._discard_pool()
            return _probe_in(self.pool(), uri)

    @staticmethod
    def _reusable(hit: tuple[str, dict], entry: Listed) -> bool:
        kind, row = hit
        if row["source_version"] != entry.source_version:
            return False
        return kind == "manifest" or row["reason"] in REUSABLE_REASONS | {"duplicate"}

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = _spawn_pool(self.workers)
        return self._pool

    def _discard_pool(self, kill: bool = False) -> None:
        """Drop the pool (killing its workers when one hangs); the next submit makes a new one."""
        if self._pool is None:
            return
        if kill:
            _kill_workers(self._pool)
        self._pool.shutdown(wait=True)  # a broken pool fails its futures with BrokenProcessPool
        self._pool = None

    def _outcome(self, job: _Job) -> dict[str, Any]:
        """The job's result within ``file_timeout_s`` of it reaching the head of the queue
        (the head is running: every earlier one has finished). A hung file gets its worker
        killed; the others in flight are then probed again, alone."""
        try:
            return job.future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._discard_pool(kill=True)
            return self._failed(job, "probe_timeout", self._timeout_detail())
        except (BrokenProcessPool, CancelledError):
            if self._pool is not None and getattr(self._pool, "_broken", False):
                self._discard_pool()
            return self._alone(job)

    def _alone(self, job: _Job) -> dict[str, Any]:
        """Probe one file in a pool of its own: whatever kills it was this file's doing."""
        pool = _spawn_pool(1)
        try:
            return _probe_in(pool, job.entry.uri).result(timeout=self.timeout_s)
        except FutureTimeout:
            _kill_workers(pool)
            return self._failed(job, "probe_timeout", self._timeout_detail())
        except BrokenProcessPool:
            return self._failed(job, "probe_crashed", "its worker process died while probing it")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _timeout_detail(self) -> str:
        return f"not done after {self.timeout_s:g} s (ingest.file_timeout_s); its worker was killed"

    def _failed(self, job: _Job, reason: str, detail: str) -> dict[str, Any]:
        log.warning("ingest: %s %s: %s", job.entry.uri, reason, detail)
        return {"reason": reason, "detail": detail, "bytes": job.entry.size}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.manifest.close()
        self.quarantine.close()

    # -- completion (listing order)

    def finish(self, job: _Job) -> None:
        entry = job.entry
        outcome = job.outcome if job.future is None else self._outcome(job)
        if job.previous is not None:
            outcome = self._from_previous(job.previous, entry)
        for key in ("fetch_s", "hash_s", "probe_s"):
            self.timings[key] += outcome.get(key, 0.0)
        if outcome.get("hash_s"):
            self.bytes_read += outcome["bytes"] or 0
        nbytes, sha = outcome.get("bytes"), outcome.get("sha256")

        reason, detail = outcome.get("reason"), outcome.get("detail")
        if reason is None:
            digest = bytes.fromhex(sha)
            if digest in self.accepted:
                reason, detail = "duplicate", duplicate_detail(sha, self.accepted[digest])
            else:
                reason, detail = bounds_violation(outcome["probe"], self.bounds) or (None, None)
        if reason is not None:
            message = outcome.get("message") or quarantine_message(reason, entry.uri, detail)
            self._quarantine(entry, reason, message, nbytes, sha)
            return
        self.accepted[digest] = entry.uri
        self.manifest.add(
            {
                "clip_id": sha,
                "uri": entry.uri,
                "bytes": nbytes,
                **outcome["probe"],
                "split": split_of(sha, self.bounds.val_fraction),
                "caption": None,  # joined when the shards are merged (:class:`_Merge`)
                "caption_source": None,
                "short_caption": None,
                "source_version": entry.source_version,
                "source_uri": entry.uri,
            }
        )

    def _from_previous(self, hit: tuple[str, dict], entry: Listed) -> dict[str, Any]:
        kind, row = hit
        if kind == "manifest":
            self.reused += 1
            probe = {key: row[key] for key in PROBE_FIELDS}
            return {"sha256": row["clip_id"], "bytes": row["bytes"], "probe": probe}
        if row["reason"] == "duplicate":
            if bytes.fromhex(row["sha256"]) not in self.accepted:
                return inspect_file(
                    entry.uri
                )  # its original is gone or changed: probe it after all
            self.reused += 1  # still a copy of an accepted clip: finish() reports it again
            return {"sha256": row["sha256"], "bytes": row["bytes"], "probe": None}
        self.reused += 1
        return {
            "reason": row["reason"],
            "message": row["message"],
            "bytes": row["bytes"],
            "sha256": row["sha256"],
        }

    def _quarantine(self, entry: Listed, reason: str, message: str, nbytes, sha) -> None:
        self.reasons[reason] += 1
        self.quarantine.add(
            {
                "uri": entry.uri,
                "reason": reason,
                "message": message,
                "bytes": nbytes,
                "sha256": sha,
                "step": "ingest",
                "source_version": entry.source_version,
            }
        )


# --------------------------------------------------------------------------- one shard


def _ingest_span(
    cfg: TesseraConfig, workdir: Path, src: str, span: Span, previous: str | None, desc: str
) -> tuple[str | None, dict[str, Any], dict[str, float]]:
    """Probe the files of ``src`` in ``span`` into ``workdir``'s two tables, deduplicated within
    the span and without captions; (source root, counts, timings)."""
    from tqdm import tqdm

    started = time.perf_counter()
    root, entries = list_source(src, span)
    with contextlib.ExitStack() as stack:
        prev = _open_previous(cfg, previous, stack)
        ingest = _Ingest(cfg, workdir, prev)
        stack.callback(ingest.close)
        bar = stack.enter_context(tqdm(desc=desc, unit="file", disable=None))
        pending: deque[_Job] = deque()
        last_uri = None
        for entry in entries:
            if last_uri is not None and entry.uri <= last_uri:
                if entry.uri == last_uri:
                    continue  # listed twice (overlapping globs): one file
                raise RuntimeError(
                    f"listing of {src} is not sorted by URI ({entry.uri} after {last_uri}); "
                    "ingest relies on sorted listings for stable output and duplicate order"
                )
            last_uri = entry.uri
            ingest.seen += 1
            pending.append(ingest.start(entry))
            while pending and (len(pending) > ingest.max_in_flight or pending[0].done()):
                ingest.finish(pending.popleft())
                bar.update()
        while pending:
            ingest.finish(pending.popleft())
            bar.update()

    ingested, quarantined = ingest.manifest.rows, ingest.quarantine.rows
    if ingest.seen != ingested + quarantined:
        raise RuntimeError(
            f"ingest lost track of files: seen {ingest.seen} != ingested {ingested} + "
            f"quarantined {quarantined}; this is a bug, please report it with the source listing"
        )
    counts = {
        "seen": ingest.seen,
        "ingested": ingested,
        "quarantined": quarantined,
        "reused": ingest.reused,
    }
    timings = {
        "probe_s": ingest.timings["probe_s"],
        "hash_s": ingest.timings["hash_s"],
        "fetch_s": ingest.timings["fetch_s"],
        "bytes_read": float(ingest.bytes_read),
        "wall_s": time.perf_counter() - started,
    }
    return root, counts, timings


def plan_shards(
    cfg: TesseraConfig, src: str, captions: str | None = None, **_: Any
) -> list[dict[str, Any]]:
    """Cut ``src``'s sorted listing into shards of ``ingest.shard_size`` files, opening none of them.

    Returns ``[{"after": uri | None, "through": uri | None, "files": n}, ...]``: shard ``i``
    holds the URIs ``after < uri <= through`` (``None``: unbounded), consecutive shards share a
    boundary, and the first and last are open-ended, so together they cover every file of the
    source once. ``files`` is the count when planned. An empty source is one empty shard.
    Given ``captions`` are checked here, before any probing.
    """
    if captions:
        Captions(captions)
    size = cfg.ingest.shard_size
    if size < 1:
        raise ValueError(f"ingest shards need at least 1 file each, got {size}")
    shards: list[dict[str, Any]] = []
    after, count, last = None, 0, None
    for uri in list_uris(src):
        if count == size:
            shards.append({"after": after, "through": last, "files": count})
            after, count = last, 0
        count, last = count + 1, uri
    shards.append({"after": after, "through": None, "files": count})
    return shards


def _shard(
    cfg: TesseraConfig,
    workdir: Path,
    part: dict[str, Any],
    src: str,
    captions: str | None,
    previous: str | None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Ingest one shard into ``workdir``: (values, metrics) of the part."""
    index = int(part.get("index", 0))
    span = Span(part.get("after"), part.get("through"))
    root, counts, timings = _ingest_span(cfg, workdir, src, span, previous, f"ingest {index}")
    values = {"index": index, "src": src, "root": root, "captions": captions or None, **counts}
    return values, {**{k: float(v) for k, v in counts.items()}, **timings}


def ingest_shard(
    cfg: TesseraConfig,
    workdir: Path,
    part: dict[str, Any],
    src: str,
    captions: str | None = None,
    previous: str | None = None,
) -> StepResult:
    """Ingest the files of one planned shard (``part``) of ``src`` into its own tables.

    Duplicates are decided within the shard only and captions are not joined yet: :func:`run`
    does both over all shards (``captions`` and the source root travel in the outputs for it).
    Args as :func:`run`.
    """
    values, metrics = _shard(cfg, Path(workdir), part, str(src), captions, previous)
    planned = part.get("files")
    print(
        f"ingest shard {values['index']}: seen {values['seen']}"
        f"{f' (planned {planned})' if planned is not None else ''} = ingested "
        f"{values['ingested']} + quarantined {values['quarantined']} before the merge"
    )
    return StepResult(
        files={"manifest": MANIFEST_FILE, "quarantine": QUARANTINE_FILE},
        values=values,
        metrics=metrics,
    )


# --------------------------------------------------------------------------- the merge


def _table_rows(path: Path, kind: str, batch_rows: int) -> Iterator[tuple[str, str, dict]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            yield row["uri"], kind, row


class _Merge:
    """Shards' rows, in URI order, into the step's two tables: a clip already accepted in an
    earlier row becomes a duplicate of the first (as in one pass), captions are joined."""

    def __init__(
        self, cfg: TesseraConfig, workdir: Path, root: str | None, captions: Captions | None
    ):
        self.root, self.captions = root, captions
        size = cfg.ingest.row_group_size
        self.manifest = _TableWriter(workdir / MANIFEST_FILE, mf.MANIFEST_SCHEMA, size)
        self.quarantine = _TableWriter(workdir / QUARANTINE_FILE, mf.QUARANTINE_SCHEMA, size)
        self.accepted: dict[bytes, str] = {}  # sha256 digest -> first URI
        self.reasons: Counter[str] = Counter()
        self.seen = 0
        self.last_uri: str | None = None

    def add(self, kind: str, row: dict) -> None:
        uri = row["uri"]
        if self.last_uri is not None and uri <= self.last_uri:
            raise ValueError(
                f"ingest shards overlap or are out of order ({uri} after {self.last_uri}); "
                "merge the parts of one plan, in their planned order"
            )
        self.last_uri = uri
        self.seen += 1
        if kind == "manifest":
            first = self.accepted.get(bytes.fromhex(row["clip_id"]))
            if first is not None:  # its original was accepted in an earlier shard
                self._quarantine(
                    {
                        "uri": uri,
                        "reason": "duplicate",
                        "message": "",
                        "bytes": row["bytes"],
                        "sha256": row["clip_id"],
                        "step": "ingest",
                        "source_version": row["source_version"],
                    },
                    first,
                )
                return
            self.accepted[bytes.fromhex(row["clip_id"])] = uri
            if self.captions is not None:
                caption, short, source = self.captions.lookup(uri, self.root)
                row.update(caption=caption, short_caption=short, caption_source=source)
            self.manifest.add(row)
            return
        first = None
        if row["reason"] == "duplicate" or (row["reason"] in BOUNDS_REASONS and row["sha256"]):
            first = self.accepted.get(bytes.fromhex(row["sha256"]))
            if first is None and row["reason"] == "duplicate":
                raise RuntimeError(
                    f"{uri} was quarantined as a duplicate of a clip that no shard accepted; "
                    "this is a bug, please report it with the source listing"
                )
        self._quarantine(row, first)

    def _quarantine(self, row: dict, first: str | None) -> None:
        if first is not None:
            detail = duplicate_detail(row["sha256"], first)
            row.update(
                reason="duplicate", message=quarantine_message("duplicate", row["uri"], detail)
            )
        self.reasons[row["reason"]] += 1
        if self.quarantine.rows < MAX_PRINTED:
            print(f"ingest: quarantined [{row['reason']}] {row['message']}")
        self.quarantine.add(row)

    def close(self) -> None:
        self.manifest.close()
        self.quarantine.close()


def _merge(
    cfg: TesseraConfig,
    workdir: Path,
    parts: list[dict[str, Any]],
    started: float,
    caption_index: Captions | None = None,
) -> StepResult:
    """The shards' tables as the step's (see :class:`_Merge`), with its values and metrics."""
    if not parts:
        raise ValueError("ingest needs at least one shard to merge; plan the source first")
    ordered = sorted(parts, key=lambda p: int(p["index"]))
    sources = {(p["src"], p.get("root"), p.get("captions")) for p in ordered}
    if len(sources) != 1:
        raise ValueError(
            f"ingest shards come from different sources or captions: {sorted(map(str, sources))}"
            "; merge the parts of one plan"
        )
    ((src, root, captions),) = sources
    if caption_index is None and captions:
        caption_index = Captions(captions)
    merge = _Merge(cfg, workdir, root, caption_index)
    batch_rows = cfg.ingest.row_group_size
    with contextlib.ExitStack() as stack:
        stack.callback(merge.close)
        for part in ordered:
            with (
                storage.local_copy(part["manifest"]) as manifest,
                storage.local_copy(part["quarantine"]) as quarantine,
            ):
                rows = heapq.merge(
                    _table_rows(manifest, "manifest", batch_rows),
                    _table_rows(quarantine, "quarantine", batch_rows),
                    key=lambda r: r[0],
                )
                for _, kind, row in rows:
                    merge.add(kind, row)

    ingested, quarantined = merge.manifest.rows, merge.quarantine.rows
    seen = sum(int(p["seen"]) for p in ordered)
    if not seen == merge.seen == ingested + quarantined:
        raise RuntimeError(
            f"ingest lost track of files: shards saw {seen}, their tables hold {merge.seen} = "
            f"ingested {ingested} + quarantined {quarantined}; this is a bug, please report it"
        )
    shown = quarantined - MAX_PRINTED
    if shown > 0:
        print(f"ingest: ... and {shown} more quarantined; see {QUARANTINE_FILE}")
    reused = sum(int(p.get("reused", 0)) for p in ordered)
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(merge.reasons.items()))
    print(
        f"ingest: seen {seen} = ingested {ingested} + quarantined {quarantined}"
        f"{f' ({by_reason})' if by_reason else ''} in {len(ordered)} shard(s); "
        f"reused {reused} from the previous run"
    )
    if caption_index is not None and (unmatched := caption_index.unmatched()):
        print(
            f"ingest: {len(unmatched)} caption row(s) matched no ingested file, e.g. "
            f"{unmatched[:3]}; check the caption paths against {src}"
        )

    values = {
        "seen": seen,
        "ingested": ingested,
        "quarantined": quarantined,
        "duplicates": merge.reasons["duplicate"],
        "reused": reused,
    }
    timing = Counter()
    for part in ordered:
        timing.update({k: float(v) for k, v in (part.get("metrics") or {}).items()})
    shards_wall_s, bytes_read = timing["wall_s"], timing["bytes_read"]
    metrics = {
        **{k: float(v) for k, v in values.items()},
        "probe_s": timing["probe_s"],
        "hash_s": timing["hash_s"],
        "fetch_s": timing["fetch_s"],
        "shards": float(len(ordered)),
        "shards_wall_s": shards_wall_s,
        "wall_s": time.perf_counter() - started,
        "mb_per_s": bytes_read / 1e6 / shards_wall_s if shards_wall_s > 0 else 0.0,
        "clips_per_s": seen / shards_wall_s if shards_wall_s > 0 else 0.0,
    }
    return StepResult(
        files={"manifest": MANIFEST_FILE, "quarantine": QUARANTINE_FILE},
        values={**values, "reasons": dict(sorted(merge.reasons.items()))},
        metrics=metrics,
        artifacts=[QUARANTINE_FILE],
    )


# --------------------------------------------------------------------------- the step


def run(
    cfg: TesseraConfig,
    workdir: Path,
    src: str | None = None,
    captions: str | None = None,
    previous: str | None = None,
    parts: list[dict[str, Any]] | None = None,
) -> StepResult:
    """Ingest every file under ``src`` into ``workdir/manifest.parquet`` + ``quarantine.parquet``.

    Args:
        src: local dir, glob, ``s3://bucket/prefix`` or list file (``@list.txt`` / ``*.txt``).
        captions: URI of a captions Parquet (``path``, ``caption``, ``short_caption``,
            ``caption_source``); files without a row get null captions.
        previous: URI of an earlier ``manifest.parquet`` (its ``quarantine.parquet`` is read
            from the same folder) whose unchanged files are not probed again. ``None``: the
            latest committed ingest in the store, if any; ``""``: probe everything.
        parts: the outputs of the :func:`ingest_shard` parts of one :func:`plan_shards` plan,
            merged into the step's tables (``src``, ``captions``, ``previous`` are then unused:
            the parts carry what the merge needs). Without them, one pass over ``src``: a
            single shard spanning the source, merged.
    """
    workdir = Path(workdir)
    started = time.perf_counter()
    if parts is not None:
        return _merge(cfg, workdir, parts, started)
    if src is None:
        raise TypeError("ingest needs src (a dir, glob, s3:// prefix or list file) or parts")
    caption_index = Captions(captions) if captions else None  # a bad table fails before probing
    with tempfile.TemporaryDirectory(prefix="tessera-ingest-") as tmp:
        values, metrics = _shard(cfg, Path(tmp), {"index": 0}, str(src), captions, previous)
        shard = {
            "manifest": str(Path(tmp) / MANIFEST_FILE),
            "quarantine": str(Path(tmp) / QUARANTINE_FILE),
            **values,
            "metrics": metrics,
        }  # what runner.run_part records for a part, with local paths
        return _merge(cfg, workdir, [shard], started, caption_index)


STEP = StepSpec("ingest", run, plan=plan_shards, part=ingest_shard)
