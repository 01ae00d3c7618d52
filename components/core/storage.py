"""One storage API over local paths, ``file://`` and ``s3://`` URIs.

Steps write their outputs through :func:`staged_output`, which commits atomically: locally a
temporary directory is renamed into place, on S3 a ``_SUCCESS`` marker is written after every
object; either way :func:`is_committed` tells a finished output from a crashed one.

S3 goes through boto3 with the endpoint from ``AWS_ENDPOINT_URL`` (MinIO, a loopback server),
multipart transfers above a threshold, and botocore's standard retry mode (exponential backoff
with jitter on throttling, 5xx and connection errors; ``AWS_MAX_ATTEMPTS`` tries, default 8).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from components.core.config import Environment

SUCCESS = "_SUCCESS"
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to do."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object or file does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    version: str  # mtime_ns locally, ETag on S3: changes whenever the content may have


# --------------------------------------------------------------------------- URIs


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def local_path(uri: str | Path) -> Path:
    """Path of a local or ``file://`` URI."""
    uri = str(uri)
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" in uri or _SCHEME.match(uri):  # a URI of another kind, or a mistyped one (s3:/b)
        raise StorageError(
            f"{uri} is not a local path; use s3://bucket/key, file:///path or a path"
        )
    return Path(uri)


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
    return parsed.netloc, parsed.path.lstrip("/")


def check_relative(rel: str, what: str = "path") -> str:
    """``rel`` if it is a relative path that stays below where it is joined: no ``..``
    segment, no absolute path, no NUL or backslash; otherwise a :class:`StorageError` naming it.

    Every name that reaches the store through :func:`join` (run ids, step and part names, S3
    keys turned into local paths, clip file names) goes through here, so none of them can
    write or delete outside the folder it is joined to.
    """
    text = str(rel)
    segments = text.strip("/").split("/")
    if (
        not text.strip("/")
        or text.startswith("/")
        or "\\" in text
        or "\0" in text
        or any(seg in ("", ".", "..") for seg in segments)
    ):
        raise StorageError(
            f"refusing {what} {text!r}: it must be a relative path with no '.', '..' or empty "
            "segments, backslashes or NUL (it would leave the folder it is joined to)"
        )
    return text


def join(uri: str | Path, *parts: str) -> str:
    """Join URI segments with '/' (local paths stay local paths); every part is checked by
    :func:`check_relative`."""
    out = str(uri).rstrip("/")
    for part in parts:
        out = f"{out}/{check_relative(str(part).strip('/'), 'path segment')}"
    return out


# --------------------------------------------------------------------------- S3 client


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str | None, region: str | None, max_attempts: int):
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
    )


def s3_client():
    env = Environment.read()
    return _client(env.aws_endpoint_url, env.aws_region, env.aws_max_attempts)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE
    )


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn botocore errors into messages that name the URI and the fix (never secrets)."""
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        raise StorageError(
            f"no usable AWS credentials for {uri}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
        ) from exc
    except EndpointConnectionError as exc:
        endpoint = Environment.read().aws_endpoint_url or "the default AWS endpoint"
        raise StorageError(
            f"cannot reach S3 at {endpoint} for {uri}: is the server running? "
            "Check AWS_ENDPOINT_URL"
        ) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        bucket = split_s3(uri)[0]
        if code == "NoSuchBucket":
            raise StorageError(
                f"S3 bucket {bucket!r} does not exist (for {uri}); create it "
                f"(aws s3 mb s3://{bucket}) or fix the URI"
            ) from exc
        if code in ("NoSuchKey", "404", "NotFound"):
            raise StorageNotFound(f"{uri} does not exist") from exc
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(
                f"access denied to {uri} ({code}): check the credentials' permissions "
                "on this bucket"
            ) from exc
        raise StorageError(f"S3 request for {uri} failed: {code or exc}") from exc
    except (S3UploadFailedError, S3TransferFailedError, BotoCoreError) as exc:
        # a transfer that ran out of retries (throttling, 5xx, dropped connections)
        raise StorageError(
            f"S3 request for {uri} failed after {Environment.read().aws_max_attempts} attempts "
            f"(AWS_MAX_ATTEMPTS): {exc}"
        ) from exc


# --------------------------------------------------------------------------- reads / writes


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return local_path(uri).exists()
    bucket, key = split_s3(uri)
    try:
        with _s3_errors(uri):
            s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except StorageNotFound:
        return False


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        path = local_path(uri)
        if not path.is_file():
            raise StorageNotFound(f"{uri} does not exist")
        return path.read_bytes()
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object; locally via a temporary name and rename, so readers never see half."""
    if not is_s3(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    if len(data) >= MULTIPART_THRESHOLD:
        upload_stream(io.BytesIO(data), uri)
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def upload_stream(stream: BinaryIO, uri: str) -> None:
    """Upload a file object; multipart above the threshold."""
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        s3_client().upload_fileobj(stream, bucket, key, Config=_transfer_config())


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[BinaryIO]:
    """A readable binary stream (S3 bodies are streamed, not loaded whole)."""
    if not is_s3(uri):
        path = local_path(uri)
        if not path.is_file():
            raise StorageNotFound(f"{uri} does not exist")
        with path.open("rb") as fh:
            yield fh
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    try:
        yield body
    finally:
        body.close()


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local path holding the object's bytes (the file itself when already local)."""
    if not is_s3(uri):
        path = local_path(uri)
        if not path.exists():
            raise StorageNotFound(f"{uri} does not exist")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tessera-") as tmp:
        path = Path(tmp) / Path(split_s3(uri)[1]).name
        download_file(uri, path)
        yield path


def download_file(uri: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        shutil.copyfile(local_path(uri), path)
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        s3_client().download_file(bucket, key, str(path), Config=_transfer_config())


def upload_file(path: Path, uri: str) -> None:
    if not is_s3(uri):
        dst = local_path(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dst)
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        s3_client().upload_file(str(path), bucket, key, Config=_transfer_config())


def copy(src: str, dst: str) -> None:
    """Copy one object between any two URIs (server-side within S3)."""
    if is_s3(src) and is_s3(dst):
        (sb, sk), (db, dk) = split_s3(src), split_s3(dst)
        with _s3_errors(src):
            s3_client().copy({"Bucket": sb, "Key": sk}, db, dk, Config=_transfer_config())
    elif is_s3(src):
        with local_copy(src) as path:
            upload_file(path, dst)
    else:
        if not local_path(src).is_file():
            raise StorageNotFound(f"{src} does not exist")
        upload_file(local_path(src), dst)


def delete(uri: str) -> None:
    """Delete one object or a local directory tree; missing is not an error."""
    if not is_s3(uri):
        path = local_path(uri)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        s3_client().delete_object(Bucket=bucket, Key=key)


def list_objects(prefix: str) -> Iterator[ObjectInfo]:
    """Stream every object under a prefix, sorted by URI within each page (flat, recursive).

    Memory stays flat: S3 listings are paginated, local trees are walked lazily.
    """
    if not is_s3(prefix):
        root = local_path(prefix)
        if root.is_file():
            st = root.stat()
            yield ObjectInfo(str(root), st.st_size, str(st.st_mtime_ns))
            return
        if not root.is_dir():
            raise StorageNotFound(f"{prefix} does not exist")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                st = path.stat()
                yield ObjectInfo(str(path), st.st_size, str(st.st_mtime_ns))
        return
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    paginator = s3_client().get_paginator("list_objects_v2")
    with _s3_errors(prefix):
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", obj["Size"], obj["ETag"].strip('"'))


# --------------------------------------------------------------------------- atomic outputs


def is_committed(uri: str) -> bool:
    """True when a step output directory was fully written (its ``_SUCCESS`` marker exists)."""
    return exists(join(uri, SUCCESS))


@contextlib.contextmanager
def staged_output(uri: str) -> Iterator[Path]:
    """Stage a step's output directory locally, then commit it to ``uri`` atomically.

    Locally the staging directory sits next to the target and is renamed into place; on S3
    every file is uploaded and ``_SUCCESS`` is written last. On an exception nothing is
    committed and the staging directory is removed.
    """
    if is_s3(uri):
        with tempfile.TemporaryDirectory(prefix="tessera-stage-") as tmp:
            yield Path(tmp)
            for path in sorted(Path(tmp).rglob("*")):
                if path.is_file():
                    upload_file(path, join(uri, path.relative_to(tmp).as_posix()))
            write_bytes(join(uri, SUCCESS), b"")
        return
    target = local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.staging-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        (staging / SUCCESS).write_bytes(b"")
        if target.exists():  # a crashed or superseded attempt: replace it whole
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
