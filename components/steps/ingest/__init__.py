"""Ingest: list raw files, hash and probe each, write ``manifest.parquet`` + ``quarantine.parquet``.

``tessera ingest SRC``. ``SRC`` is a local directory, a glob (``/data/*.mp4``), an
``s3://bucket/prefix`` (or an S3 glob, where ``*`` also crosses ``/``), or a list file
(``@list.txt``, or any ``.txt`` file: one URI per line, ``#`` comments, paths relative to the list).

Every file seen ends in exactly one of the two tables (``seen == ingested + quarantined`` is
checked): a clip passes when it has a decodable video stream inside the ``ingest`` bounds and is
not a byte-for-byte copy of a clip already accepted; anything else gets a quarantine row with a
reason from :data:`components.core.manifest.REASONS` and a message saying what to do.

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
alongside the listing (flat memory).

Timings: ``hash_s`` / ``probe_s`` / ``fetch_s`` are summed over files (worker seconds), ``wall_s``
is elapsed. Known limits: a file that crashes FFmpeg (segfault) breaks the pool and fails the
step, a file that hangs the decoder hangs its worker (no per-file timeout yet), and list files
of S3 URIs are stat'ed with one HEAD request per entry, serially.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.core import manifest as mf
from components.core import runner, storage
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec
from components.steps.ingest.listing import Listed, list_source
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


# --------------------------------------------------------------------------- the step


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


class _Ingest:
    """Turns listed files into manifest and quarantine rows, in listing order."""

    def __init__(
        self,
        cfg: TesseraConfig,
        workdir: Path,
        root: str | None,
        captions: Captions | None,
        previous: Previous | None,
    ):
        self.bounds = cfg.ingest
        self.root, self.captions, self.previous = root, captions, previous
        workers = cfg.ingest.workers if cfg.ingest.workers > 0 else os.cpu_count() or 1
        self.workers = workers
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
        elif self.workers > 1:
            job.future = self.pool().submit(inspect_file, entry.uri)
        else:
            job.outcome = inspect_file(entry.uri)
        return job

    @staticmethod
    def _reusable(hit: tuple[str, dict], entry: Listed) -> bool:
        kind, row = hit
        if row["source_version"] != entry.source_version:
            return False
        return kind == "manifest" or row["reason"] in REUSABLE_REASONS | {"duplicate"}

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            import multiprocessing

            # spawn, not fork: the parent holds boto3 connections and FFmpeg state
            self._pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.manifest.close()
        self.quarantine.close()

    # -- completion (listing order)

    def finish(self, job: _Job) -> None:
        entry = job.entry
        outcome = job.outcome if job.future is None else job.future.result()
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
                reason, detail = (
                    "duplicate",
                    f"same sha256 {sha[:12]}... as {self.accepted[digest]}",
                )
            else:
                reason, detail = bounds_violation(outcome["probe"], self.bounds) or (None, None)
        if reason is not None:
            message = outcome.get("message") or quarantine_message(reason, entry.uri, detail)
            self._quarantine(entry, reason, message, nbytes, sha)
            return
        self.accepted[digest] = entry.uri
        caption, short, source = (
            self.captions.lookup(entry.uri, self.root) if self.captions else (None, None, None)
        )
        self.manifest.add(
            {
                "clip_id": sha,
                "uri": entry.uri,
                "bytes": nbytes,
                **outcome["probe"],
                "split": split_of(sha, self.bounds.val_fraction),
                "caption": caption,
                "caption_source": source,
                "short_caption": short,
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
        if sum(self.reasons.values()) <= MAX_PRINTED:
            print(f"ingest: quarantined [{reason}] {message}")
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


def run(
    cfg: TesseraConfig,
    workdir: Path,
    src: str,
    captions: str | None = None,
    previous: str | None = None,
) -> StepResult:
    """Ingest every file under ``src`` into ``workdir/manifest.parquet`` + ``quarantine.parquet``.

    Args:
        src: local dir, glob, ``s3://bucket/prefix`` or list file (``@list.txt`` / ``*.txt``).
        captions: URI of a captions Parquet (``path``, ``caption``, ``short_caption``,
            ``caption_source``); files without a row get null captions.
        previous: URI of an earlier ``manifest.parquet`` (its ``quarantine.parquet`` is read
            from the same folder) whose unchanged files are not probed again. ``None``: the
            latest committed ingest in the store, if any; ``""``: probe everything.
    """
    from tqdm import tqdm

    workdir = Path(workdir)
    started = time.perf_counter()
    root, entries = list_source(src)
    caption_index = Captions(captions) if captions else None
    with contextlib.ExitStack() as stack:
        prev = _open_previous(cfg, previous, stack)
        ingest = _Ingest(cfg, workdir, root, caption_index, prev)
        stack.callback(ingest.close)
        bar = stack.enter_context(tqdm(desc="ingest", unit="file", disable=None))
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
    wall_s = time.perf_counter() - started

    ingested, quarantined = ingest.manifest.rows, ingest.quarantine.rows
    if ingest.seen != ingested + quarantined:
        raise RuntimeError(
            f"ingest lost track of files: seen {ingest.seen} != ingested {ingested} + "
            f"quarantined {quarantined}; this is a bug, please report it with the source listing"
        )
    shown = quarantined - MAX_PRINTED
    if shown > 0:
        print(f"ingest: ... and {shown} more quarantined; see {QUARANTINE_FILE}")
    by_reason = ", ".join(f"{k} {v}" for k, v in sorted(ingest.reasons.items()))
    print(
        f"ingest: seen {ingest.seen} = ingested {ingested} + quarantined {quarantined}"
        f"{f' ({by_reason})' if by_reason else ''}; reused {ingest.reused} from the previous run"
    )
    if caption_index is not None and (unmatched := caption_index.unmatched()):
        print(
            f"ingest: {len(unmatched)} caption row(s) matched no ingested file, e.g. "
            f"{unmatched[:3]}; check the caption paths against {src}"
        )

    values = {
        "seen": ingest.seen,
        "ingested": ingested,
        "quarantined": quarantined,
        "duplicates": ingest.reasons["duplicate"],
        "reused": ingest.reused,
    }
    metrics = {
        **{k: float(v) for k, v in values.items()},
        "probe_s": ingest.timings["probe_s"],
        "hash_s": ingest.timings["hash_s"],
        "fetch_s": ingest.timings["fetch_s"],
        "wall_s": wall_s,
        "mb_per_s": ingest.bytes_read / 1e6 / wall_s if wall_s > 0 else 0.0,
        "clips_per_s": ingest.seen / wall_s if wall_s > 0 else 0.0,
    }
    return StepResult(
        files={"manifest": MANIFEST_FILE, "quarantine": QUARANTINE_FILE},
        values={**values, "reasons": dict(sorted(ingest.reasons.items()))},
        metrics=metrics,
        artifacts=[QUARANTINE_FILE],
    )


STEP = StepSpec("ingest", run)
