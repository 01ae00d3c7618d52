"""One storage suite, run against a local directory and a real S3 endpoint on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.core import storage
from tests.testing_utils.s3_proxy import FaultyS3Proxy


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    bucket = request.getfixturevalue("s3_env")
    return f"s3://{bucket}/prefix"


def test_write_read_exists_delete(root):
    uri = storage.join(root, "a", "b.txt")
    assert not storage.exists(uri)
    storage.write_text(uri, "hello")
    assert storage.exists(uri)
    assert storage.read_text(uri) == "hello"
    with storage.open_read(uri) as fh:
        assert fh.read() == b"hello"
    with storage.local_copy(uri) as path:
        assert path.read_bytes() == b"hello"
    storage.delete(uri)
    assert not storage.exists(uri)


def test_missing_object_is_clear(root):
    uri = storage.join(root, "nope.bin")
    with pytest.raises(storage.StorageNotFound, match="nope.bin does not exist"):
        storage.read_bytes(uri)


def test_listing_is_recursive_sorted_and_versioned(root):
    for name in ("b/2.txt", "a.txt", "b/1.txt", "c/d/e.txt"):
        storage.write_text(storage.join(root, name), name)
    infos = list(storage.list_objects(root))
    names = [i.uri.split("store/")[-1].split("prefix/")[-1] for i in infos]
    assert names == ["a.txt", "b/1.txt", "b/2.txt", "c/d/e.txt"]
    assert all(i.size == len(n) and i.version for i, n in zip(infos, names, strict=True))


def test_copy_between_uris(root, tmp_path):
    src = storage.join(root, "src.bin")
    storage.write_bytes(src, b"\x00\x01" * 1000)
    dst = storage.join(root, "copied", "dst.bin")
    storage.copy(src, dst)
    assert storage.read_bytes(dst) == b"\x00\x01" * 1000
    local = str(tmp_path / "local.bin")
    storage.copy(src, local)
    assert Path(local).read_bytes() == b"\x00\x01" * 1000


def test_staged_output_commits_atomically(root):
    out = storage.join(root, "runs", "r1", "step")
    with storage.staged_output(out) as work:
        (work / "sub").mkdir()
        (work / "sub" / "x.txt").write_text("x")
        assert not storage.is_committed(out)
    assert storage.is_committed(out)
    assert storage.read_text(storage.join(out, "sub", "x.txt")) == "x"


def test_staged_output_commits_nothing_on_error(root):
    out = storage.join(root, "runs", "r2", "step")
    with pytest.raises(RuntimeError), storage.staged_output(out) as work:
        (work / "half.txt").write_text("half")
        raise RuntimeError("crash mid-step")
    assert not storage.is_committed(out)
    assert not storage.exists(storage.join(out, "half.txt"))


def test_large_object_uses_multipart(root, monkeypatch, tmp_path):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    data = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MiB: three parts
    uri = storage.join(root, "big.bin")
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
        assert etag.strip('"').endswith("-3"), etag  # S3 marks multipart ETags with "-<parts>"
    path = tmp_path / "down.bin"
    storage.download_file(uri, path)
    assert path.read_bytes() == data


def test_missing_bucket_names_bucket_and_fix(s3_env):
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes("s3://no-such-bucket-tessera/x")
    assert "bucket 'no-such-bucket-tessera' does not exist" in str(err.value)
    assert "aws s3 mb" in str(err.value)


def test_missing_credentials_are_named_not_printed(s3_server, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    storage._client.cache_clear()
    try:
        with pytest.raises(storage.StorageError, match="AWS_ACCESS_KEY_ID"):
            storage.read_bytes("s3://bucket/key")
    finally:
        storage._client.cache_clear()


def test_unreachable_endpoint(monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    storage._client.cache_clear()
    try:
        with pytest.raises(storage.StorageError, match="cannot reach S3"):
            storage.read_bytes("s3://bucket/key")
    finally:
        storage._client.cache_clear()


def test_transient_503_is_retried(s3_env, s3_server, monkeypatch):
    bucket = s3_env
    storage.write_text(f"s3://{bucket}/k.txt", "survives")
    with FaultyS3Proxy(s3_server, fail_first=3).running() as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage._client.cache_clear()
        try:
            assert storage.read_text(f"s3://{bucket}/k.txt") == "survives"
            assert proxy.seen == 4  # three 503s, then the answer
        finally:
            storage._client.cache_clear()
