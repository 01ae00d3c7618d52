"""Probe one file: hash it, open it with PyAV, decode its first frame, or say why it is rejected.

:func:`probe_file` is what ingest knows about a file; :func:`_inspect` runs in a pool worker,
fetches (S3), hashes and probes one file and never raises on bad input: a rejection comes back
as a quarantine reason from :data:`components.core.manifest.REASONS` and a detail.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import av

from components.core import faults, storage
from components.core import manifest as mf
from components.core.config import IngestConfig

PROBE_PACKETS = 64  # packets tried before a video stream is declared undecodable
SNIFF_BYTES = 4096

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
    "probe_timeout": "re-encode it (`ffmpeg -i FILE -c:v libx264 fixed.mp4`), or raise "
    "ingest.file_timeout_s if the file is just huge and the machine slow",
    "probe_crashed": "re-encode it (`ffmpeg -i FILE -c:v libx264 fixed.mp4`) or drop it; a "
    "file that crashes FFmpeg is also worth reporting upstream",
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
    (counted by demuxing; ``frames_counted`` when the headers had no count or a lower one, and
    a file whose headers promise more frames than it holds is rejected as truncated),
    ``duration_s``, ``kind`` (``video`` | ``image``) and ``has_audio``. The first frame is
    always decoded, so a file that passes is known to decode.
    """
    path = Path(path)
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (PermissionError, IsADirectoryError) as exc:
        raise Rejected("unreadable", error_text(exc)) from None
    except (av.FFmpegError, OSError) as exc:
        reason, what = _sniff(path)
        raise Rejected(reason, f"FFmpeg cannot open it: {error_text(exc)}; {what}") from None
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
        # what the file holds, not what its headers promise: a cut upload keeps headers that
        # count frames its data no longer has (AVI), and Matroska has no count at all
        header, num_frames = stream.frames, _count_frames(path, stream.index)
        if header > num_frames:
            raise Rejected(
                "corrupt",
                f"truncated: the headers promise {header} frames but the file holds {num_frames}",
            )
        counted = header != num_frames
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
            raise Rejected("corrupt", f"reading packet {tried} failed: {error_text(exc)}") from None
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
    why = f"; last error: {error_text(last_error)}" if last_error else ""
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
        raise Rejected("corrupt", f"counting frames failed: {error_text(exc)}") from None


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
        return "unreadable", error_text(exc)
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


def error_text(exc: BaseException | None) -> str:
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


def inspect_file(uri: str) -> dict[str, Any]:
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
    name = uri.rsplit("/", 1)[-1]
    if faults.triggered(f"ingest.hang.{name}"):  # drills of the per-file bound (ingest)
        time.sleep(86400)
    if faults.triggered(f"ingest.crash.{name}"):
        os.kill(os.getpid(), signal.SIGSEGV)
    t0 = time.perf_counter()
    try:
        with storage.local_copy(uri) as path:
            t1 = time.perf_counter()
            out["fetch_s"] = t1 - t0 if storage.is_s3(uri) else 0.0
            try:
                out["bytes"] = path.stat().st_size
                out["sha256"] = sha256_file(path)
            except OSError as exc:
                out.update(reason="unreadable", detail=error_text(exc))
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
        out.update(reason="unreadable", detail=error_text(exc))
    return out
