"""Ingest: list raw files, hash and probe each, write ``manifest.parquet`` + ``quarantine.parquet``.

``tessera ingest SRC``. ``SRC`` is a local directory, a glob (``/data/*.mp4``), an
``s3://bucket/prefix`` (or an S3 glob, where ``*`` also crosses ``/``), or a list file
(``@list.txt``, or any ``.txt`` file: one URI per line, ``#`` comments, paths relative to the list).

Every file seen ends in exactly one of the two tables (``seen == ingested + quarantined`` is
checked): a clip passes when it has a decodable video stream inside the ``ingest`` bounds and is
not a byte-for-byte copy of a clip already accepted; anything else gets a quarantine row with a
reason from :data:`components.manifest.REASONS` and a message saying what to do.

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
import fnmatch
import glob
import hashlib
import heapq
import logging
import os
import stat
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import av
import pyarrow as pa
import pyarrow.parquet as pq

from components import manifest as mf
from components import runner, storage
from components.config import IngestConfig, TesseraConfig
from components.runner import StepResult

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.parquet"
QUARANTINE_FILE = "quarantine.parquet"
MAX_PRINTED = 20  # quarantine messages printed one by one; the rest are only in the table
PROBE_PACKETS = 64  # packets tried before a video stream is declared undecodable
SNIFF_BYTES = 4096
INFLIGHT_PER_WORKER = 4  # futures in flight per worker: keeps workers busy, memory bounded

PROBE_FIELDS = (
    "container",
    "codec",
    "width",
    "height",
    "fps",
    "num_frames",
    "duration_s",
    "kind",
    "has_audio",
    "rotation",
    "frames_counted",
)

# Quarantine reasons that depend only on the file's bytes: reused as-is from a previous run.
# Bounds-based ones depend on the config, unreadable/missing may have been fixed since, and
# unsupported_codec depends on the FFmpeg build: those files are probed again.
REUSABLE_REASONS = frozenset(
    {"zero_bytes", "not_media", "corrupt", "no_video_stream", "undecodable"}
)

ADVICE = {
    "zero_bytes": "re-export or re-upload it, or delete it from the source",
    "unreadable": "fix its permissions (chmod a+r; a+rx for a folder) or the mount, then re-run "
    "ingest",
    "missing": "fix the list or restore the file, then re-run ingest",
    "not_media": "remove it from the source: only video and image files belong there",
    "corrupt": "re-download or re-encode it (`ffmpeg -i FILE -c copy fixed.mp4` can rescue a "
    "cut file)",
    "no_video_stream": "remove it from the source: audio-only files cannot train a video model",
    "undecodable": "re-encode it (`ffmpeg -i FILE -c:v libx264 fixed.mp4`) or drop it",
    "unsupported_codec": "re-encode it to H.264 (`ffmpeg -i FILE -c:v libx264 fixed.mp4`)",
    "too_short": "drop it, or lower ingest.min_frames / ingest.min_duration_s "
    "(--set ingest.min_frames=N)",
    "too_long": "split it into shorter clips, or raise ingest.max_frames / ingest.max_duration_s",
    "resolution_out_of_bounds": "resize or crop it, or change ingest.min_side / ingest.max_side "
    "/ ingest.max_aspect",
    "duplicate": "nothing to do (the first copy is in the manifest); delete this one to save space",
}

# Leading bytes of containers FFmpeg reads: an unopenable file starting like this is damaged
# media ("corrupt"), not something else renamed ("not_media").
MEDIA_MAGIC = (
    (4, b"ftyp", "MP4/QuickTime"),
    (4, b"moov", "QuickTime"),
    (4, b"mdat", "QuickTime"),
    (4, b"free", "QuickTime"),
    (4, b"wide", "QuickTime"),
    (4, b"skip", "QuickTime"),
    (0, b"\x1aE\xdf\xa3", "Matroska/WebM"),
    (0, b"RIFF", "RIFF (AVI/WebP)"),
    (0, b"OggS", "Ogg"),
    (0, b"FLV\x01", "FLV"),
    (0, b"GIF8", "GIF"),
    (0, b"\x89PNG", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x00\x00\x01\xba", "MPEG-PS"),
    (0, b"\x00\x00\x01\xb3", "MPEG video"),
    (0, b"0&\xb2u", "ASF/WMV"),
    (0, b"YUV4MPEG2", "Y4M"),
)
OTHER_MAGIC = (
    (b"%PDF", "a PDF"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "gzip data"),
    (b"\x7fELF", "an executable"),
    (b"SQLite format", "an SQLite database"),
    (b"PAR1", "a Parquet file"),
)
MEDIA_EXTENSIONS = frozenset(
    {
        "mp4",
        "m4v",
        "mov",
        "qt",
        "mkv",
        "webm",
        "avi",
        "mpg",
        "mpeg",
        "ts",
        "m2ts",
        "mts",
        "flv",
        "wmv",
        "asf",
        "3gp",
        "3g2",
        "ogv",
        "gif",
        "png",
        "jpg",
        "jpeg",
        "webp",
        "bmp",
        "tif",
        "tiff",
        "heic",
        "heif",
        "avif",
        "y4m",
        "mxf",
        "dv",
    }
)
TEXT_FORMATS = frozenset({"tty"})  # FFmpeg renders .txt/.nfo files as "video": never media here
_TEXT_BYTES = bytes({7, 8, 9, 10, 12, 13, 27} | set(range(0x20, 0x100)) - {0x7F})


class Rejected(Exception):
    """A file that cannot enter the manifest: ``reason`` is a key of ``manifest.REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- one file


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, streamed (memory stays flat for any size)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def probe_file(path: str | Path) -> dict[str, Any]:
    """Probe one local file with PyAV; raises :class:`Rejected` when it is not usable media.

    Returns ``container`` (short format name, e.g. ``mp4``), ``codec``, ``width`` and ``height``
    in pixels *as displayed* (swapped for 90/270 degree rotation metadata), ``rotation``
    (degrees counter-clockwise, 0..359), ``fps`` (average; 0 for stills), ``num_frames``
    (headers, or counted by demuxing when the headers have none: then ``frames_counted``),
    ``duration_s``, ``kind`` (``video`` | ``image``) and ``has_audio``. The first frame is
    always decoded, so a file that passes is known to decode.
    """
    path = Path(path)
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (PermissionError, IsADirectoryError) as exc:
        raise Rejected("unreadable", _error_text(exc)) from None
    except (av.FFmpegError, OSError) as exc:
        reason, what = _sniff(path)
        raise Rejected(reason, f"FFmpeg cannot open it: {_error_text(exc)}; {what}") from None
    with container:
        return _probe_open(container, path)


def _probe_open(container: Any, path: Path) -> dict[str, Any]:
    fmt = container.format.name
    if fmt in TEXT_FORMATS:
        raise Rejected("not_media", f"FFmpeg reads it as text ({fmt} format)")
    videos = [
        s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic
    ]
    if not videos:
        if not container.streams:
            raise Rejected("not_media", f"FFmpeg opens it as {fmt!r} but finds no streams")
        found = ", ".join(f"{s.type} {_codec_name(s)}" for s in container.streams)
        raise Rejected("no_video_stream", f"streams found: {found}")
    stream = videos[0]
    ctx = stream.codec_context
    if ctx is None:
        raise Rejected("unsupported_codec", "the video stream's codec has no decoder in this build")
    _check_not_truncated(stream, path)

    if not ctx.is_open:  # one frame: threads only add latency; the pool gives the parallelism
        ctx.thread_count = 1
    first = _first_frame(container, stream)
    rotation = _rotation(first, stream)
    width, height = ctx.width or first.width, ctx.height or first.height
    if rotation in (90, 270):
        width, height = height, width

    kind = "image" if fmt == "image2" or fmt.endswith("_pipe") else "video"
    if kind == "image":
        num_frames, fps, duration_s, counted = 1, 0.0, 0.0, False
    else:
        num_frames, counted = stream.frames, False
        if num_frames <= 0:  # no count in the headers (Matroska, streams): demux and count
            num_frames, counted = _count_frames(path, stream.index), True
        duration_s = 0.0
        if stream.duration and stream.time_base:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration:
            duration_s = container.duration / av.time_base
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if not fps and duration_s > 0:
            fps = num_frames / duration_s
        if not duration_s and fps:
            duration_s = num_frames / fps
    return {
        "container": _container_name(fmt, path),
        "codec": _codec_name(stream),
        "width": int(width),
        "height": int(height),
        "fps": fps,
        "num_frames": int(num_frames),
        "duration_s": duration_s,
        "kind": kind,
        "has_audio": bool(container.streams.audio),
        "rotation": rotation,
        "frames_counted": counted,
    }


def _check_not_truncated(stream: Any, path: Path) -> None:
    """Headers that index packets past the end of the file mean the file was cut short."""
    entries = stream.index_entries
    n = len(entries)
    if not n:
        return
    end = max(entries[i].pos + entries[i].size for i in range(max(0, n - 4), n))
    size = path.stat().st_size
    if end > size:
        raise Rejected(
            "corrupt", f"truncated: the index points to byte {end:,} but the file has {size:,}"
        )


def _first_frame(container: Any, stream: Any) -> Any:
    packets = container.demux(stream)
    last_error: Exception | None = None
    tried = 0
    while tried < PROBE_PACKETS:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.FFmpegError as exc:
            raise Rejected(
                "corrupt", f"reading packet {tried} failed: {_error_text(exc)}"
            ) from None
        tried += 1
        try:
            frames = stream.decode(packet)  # the final empty packet flushes the decoder
        except av.DecoderNotFoundError:
            raise Rejected("unsupported_codec", f"no decoder for {_codec_name(stream)}") from None
        except av.FFmpegError as exc:
            last_error = exc
            continue
        if frames:
            return frames[0]
    why = f"; last error: {_error_text(last_error)}" if last_error else ""
    raise Rejected(
        "undecodable", f"no {_codec_name(stream)} frame decoded from the first {tried} packets{why}"
    )


def _rotation(frame: Any, stream: Any) -> int:
    """Counter-clockwise display rotation in degrees, 0..359 (display matrix, else ``rotate``)."""
    degrees = frame.rotation
    if not degrees:
        try:
            degrees = float(stream.metadata.get("rotate", 0))
        except ValueError:
            degrees = 0
    return int(round(degrees)) % 360


def _count_frames(path: Path, index: int) -> int:
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            return sum(1 for p in container.demux(container.streams[index]) if p.size)
    except av.FFmpegError as exc:
        raise Rejected("corrupt", f"counting frames failed: {_error_text(exc)}") from None


def _codec_name(stream: Any) -> str:
    ctx = stream.codec_context
    return ctx.codec.canonical_name if ctx is not None else "unknown"


def _container_name(fmt: str, path: Path) -> str:
    """Short container name: FFmpeg's ``mov,mp4,m4a,...`` -> the one the extension names."""
    names = fmt.split(",")
    ext = path.suffix.lower().lstrip(".")
    return ext if ext in names else names[0].removesuffix("_pipe")


def _sniff(path: Path) -> tuple[str, str]:
    """(reason, description) for a file FFmpeg cannot open: damaged media or something else."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        return "unreadable", _error_text(exc)
    for offset, magic, name in MEDIA_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return "corrupt", f"it starts like {name}, so the container is damaged"
    if len(head) > 188 and head[0] == head[188] == 0x47:
        return "corrupt", "it starts like MPEG-TS, so the container is damaged"
    for magic, name in OTHER_MAGIC:
        if head.startswith(magic):
            return "not_media", f"it is {name}"
    if not head.translate(None, _TEXT_BYTES):
        return "not_media", "it is a text file"
    if path.suffix.lower().lstrip(".") in MEDIA_EXTENSIONS:
        return "corrupt", f"binary data with a {path.suffix} name but no known header (damaged?)"
    return "not_media", "binary data without a known video or image header"


def _error_text(exc: BaseException | None) -> str:
    """FFmpeg/OS error text without the file name (local temp paths must not reach the tables)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).rstrip(".")


def bounds_violation(probe: dict[str, Any], bounds: IngestConfig) -> tuple[str, str] | None:
    """(reason, detail) when a probed file is outside the ``ingest`` bounds, else None.

    Stills are exempt from the frame and duration bounds: an image is a one-frame clip by design.
    """
    w, h = probe["width"], probe["height"]
    short, long = min(w, h), max(w, h)
    if short < bounds.min_side or long > bounds.max_side or long > bounds.max_aspect * short:
        return "resolution_out_of_bounds", (
            f"{w}x{h}; allowed: sides {bounds.min_side}..{bounds.max_side}, "
            f"aspect up to {bounds.max_aspect:g}:1"
        )
    if probe["kind"] != "video":
        return None
    n, d = probe["num_frames"], probe["duration_s"]
    if n < bounds.min_frames or d < bounds.min_duration_s:
        return "too_short", (
            f"{n} frames, {d:.3g} s; need at least {bounds.min_frames} frames and "
            f"{bounds.min_duration_s:g} s"
        )
    if n > bounds.max_frames or d > bounds.max_duration_s:
        return "too_long", (
            f"{n} frames, {d:.3g} s; allowed at most {bounds.max_frames} frames and "
            f"{bounds.max_duration_s:g} s"
        )
    return None


def quarantine_message(reason: str, uri: str, detail: str) -> str:
    """What is wrong with which file, and what to do about it."""
    return f"{uri}: {mf.REASONS[reason]} ({detail}); {ADVICE[reason]}"


def split_of(clip_id: str, val_fraction: float) -> str:
    """``val`` for a deterministic ``val_fraction`` of clips (by their sha256), else ``train``."""
    return "val" if int(clip_id[:16], 16) < val_fraction * 2**64 else "train"


def _inspect(uri: str) -> dict[str, Any]:
    """Fetch (S3), hash and probe one file; runs in a pool worker and never raises on bad input."""
    out: dict[str, Any] = {
        "sha256": None,
        "bytes": None,
        "probe": None,
        "reason": None,
        "detail": None,
        "fetch_s": 0.0,
        "hash_s": 0.0,
        "probe_s": 0.0,
    }
    t0 = time.perf_counter()
    try:
        with storage.local_copy(uri) as path:
            t1 = time.perf_counter()
            out["fetch_s"] = t1 - t0 if storage.is_s3(uri) else 0.0
            try:
                out["bytes"] = path.stat().st_size
                out["sha256"] = sha256_file(path)
            except OSError as exc:
                out.update(reason="unreadable", detail=_error_text(exc))
                return out
            t2 = time.perf_counter()
            out["hash_s"] = t2 - t1
            if out["bytes"] == 0:
                out.update(reason="zero_bytes", detail="0 bytes")
                return out
            try:
                out["probe"] = probe_file(path)
            except Rejected as exc:
                out.update(reason=exc.reason, detail=exc.detail)
            except Exception as exc:  # a PyAV surprise on one file must not sink the whole run
                detail = f"probing raised {type(exc).__name__}: {exc}; if many files show this, "
                out.update(reason="corrupt", detail=detail + "it is an ingest bug: report it")
            out["probe_s"] = time.perf_counter() - t2
            if out["detail"]:
                out["detail"] = out["detail"].replace(str(path), uri)
    except storage.StorageNotFound:
        out.update(reason="missing", detail="it disappeared between listing and reading")
    except storage.StorageError as exc:
        out.update(reason="unreadable", detail=str(exc))
    except OSError as exc:
        out.update(reason="unreadable", detail=_error_text(exc))
    return out


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
        detail = f"cannot list this directory ({_error_text(exc)})"
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
        return Listed(path, None, "", ("unreadable", _error_text(exc)))
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
            job.future = self.pool().submit(_inspect, entry.uri)
        else:
            job.outcome = _inspect(entry.uri)
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
                return _inspect(entry.uri)  # its original is gone or changed: probe it after all
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
