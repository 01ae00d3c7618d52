"""Identifiers and paths from users or shared stores cannot reach outside the store: run ids,
path segments, S3 keys turned into local files and the clip ids that name DVC's files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from components.core import artifacts, storage
from components.core.config import ConfigError, TesseraConfig
from components.core.runner import RunContext, check_run_id
from components.steps import version
from tests.components.steps.test_version import row_for, write_manifest

pytestmark = pytest.mark.fault("bad input: identifiers and paths")

HOSTILE_SEGMENTS = ["..", "../x", "a/../../b", "./a", "a//b", "a\\..\\b", "a\0b", ""]


@pytest.mark.parametrize("part", HOSTILE_SEGMENTS)
def test_join_refuses_segments_that_leave_the_folder(part):
    with pytest.raises(storage.StorageError, match="refusing path segment"):
        storage.join("s3://bucket/store", "runs", part)


@pytest.mark.parametrize(
    "uri", ["http://169.254.169.254/latest", "ftp://h/x", "gs://b/k", "hdfs://n/p", "s3:/b/k"]
)
def test_only_paths_file_and_s3_uris_reach_the_store(uri, tmp_path):
    """The allow-list: a local path, file:// or s3://bucket/key; anything else is refused
    before any request or file access, naming the URI."""
    for use in (storage.exists, storage.read_bytes, lambda u: storage.write_text(u, "x")):
        with pytest.raises(storage.StorageError, match="is not a local path|is not an s3://"):
            use(uri)
    assert not any(tmp_path.iterdir())


def test_join_keeps_a_leading_slash_below_the_folder_and_check_relative_refuses_it():
    assert storage.join("/store", "runs", "/etc") == "/store/runs/etc"
    with pytest.raises(storage.StorageError, match="refusing key '/etc'"):
        storage.check_relative("/etc", "key")


@pytest.mark.parametrize(
    "run_id", ["../../victim", "..", ".hidden", "a/b", "a b", "", "x" * 251, "a\nb", "é"]
)
def test_run_ids_outside_airflows_pattern_are_refused(run_id):
    with pytest.raises(ConfigError, match="invalid run id"):
        RunContext(run_id)


@pytest.mark.parametrize(
    "run_id", ["manual__2026-12-03T05:13:46.123456+00:00", "demo-demo-2adce60296", "cli-x_1~2"]
)
def test_airflow_and_tessera_run_ids_pass(run_id):
    assert check_run_id(run_id) == run_id


def test_cli_run_id_with_dotdot_is_refused_and_touches_nothing(tmp_path):
    """Before: ``--run-id ../../victim`` made the step's output folder ``victim`` beside the
    store, which a retry then removed whole."""
    home = tmp_path / "home"
    victim = tmp_path / "victim"
    (victim / "keep").mkdir(parents=True)
    (victim / "keep" / "data.txt").write_text("precious")
    tessera = str(Path(sys.executable).with_name("tessera"))
    proc = subprocess.run(
        [tessera, "ingest", str(tmp_path), "--run-id", "../../../victim", "--no-track"],
        env={"TESSERA_HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "invalid run id '../../../victim'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (victim / "keep" / "data.txt").read_text() == "precious"
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]


def test_s3_key_with_dotdot_does_not_escape_the_download_folder(s3_env, tmp_path, monkeypatch):
    bucket = s3_env
    client = storage.s3_client()
    client.put_object(Bucket=bucket, Key="model/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key="model/../../../escaped.txt", Body=b"planted")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with (
        pytest.raises(storage.StorageError, match=r"refusing S3 key under .*'\.\./\.\./"),
        artifacts.local_tree(f"s3://{bucket}/model") as path,
    ):
        raise AssertionError(f"the tree was downloaded into {path}")
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.parametrize("clip_id", ["../../../outside", "a" * 63, "A" * 64, "x.mp4/../y"])
def test_a_crafted_clip_id_cannot_pick_the_file_name_dvc_writes(tmp_path, monkeypatch, clip_id):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    clip = tmp_path / "raw" / "clip.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"\x00" * 1200)
    row = {**row_for(clip, 1), "clip_id": clip_id}
    manifest = write_manifest(tmp_path, [row], "manifest.parquet")
    with pytest.raises(version.VersionError, match="refusing clip"):
        version.run(TesseraConfig(), tmp_path / "work", manifest=manifest)
    assert not list(tmp_path.rglob("outside*"))
