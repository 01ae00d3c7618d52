"""Version step: DVC round trip (version, change, version, checkout old == original bytes)."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from components.core import manifest as mf
from components.core import storage
from components.core.config import TesseraConfig, VersionConfig
from components.steps import version
from tests.testing_utils.step_tester import StepTesterMixin


def write_clips(root: Path, n: int = 3) -> list[dict]:
    """``n`` small clip files and their manifest rows (clip_id = sha256 of the bytes)."""
    rows = []
    for i in range(n):
        path = root / "raw" / f"clip_{i}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([i]) * (1000 + 17 * i))
        rows.append(row_for(path, i))
    return rows


def row_for(path: Path, i: int) -> dict:
    data = path.read_bytes()
    return {
        "clip_id": hashlib.sha256(data).hexdigest(),
        "uri": str(path),
        "bytes": len(data),
        "container": "mp4",
        "codec": "h264",
        "width": 64,
        "height": 48,
        "fps": 24.0,
        "num_frames": 9,
        "duration_s": 9 / 24,
        "split": "val" if i == 0 else "train",
        "caption": f"clip number {i}",
        "caption_source": "given",
        "kind": "video",
    }


def write_manifest(root: Path, rows: list[dict], name: str) -> str:
    uri = str(root / name)
    mf.write_table(mf.table_from_rows(rows, mf.MANIFEST_SCHEMA), uri)
    return uri


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def round_trip(cfg: TesseraConfig, tmp_path: Path, drop_cache: bool = False) -> None:
    rows = write_clips(tmp_path)
    manifest_1 = write_manifest(tmp_path, rows, "manifest_1.parquet")
    captions = str(tmp_path / "captions.parquet")
    captions_table = pa.table(
        {"clip_id": [r["clip_id"] for r in rows], "caption": [r["caption"] for r in rows]}
    )
    mf.write_table(captions_table, captions)
    expected = {
        "manifest.parquet": Path(manifest_1).read_bytes(),
        "captions.parquet": Path(captions).read_bytes(),
    }
    for r in rows:
        expected[f"clips/{r['clip_id']}.mp4"] = Path(r["uri"]).read_bytes()

    first = version.run(cfg, tmp_path / "w1", manifest=manifest_1, captions=captions)
    assert first.values["num_clips"] == 3
    assert first.values["dataset_md5"].endswith(".dir")
    check_versioned_manifest(str(tmp_path / "w1" / first.files["manifest"]), first, expected)

    again = version.run(cfg, tmp_path / "w1b", manifest=manifest_1, captions=captions)
    assert again.values["dataset_rev"] == first.values["dataset_rev"]  # same data, no new commit

    # change one clip's bytes (so its clip_id) and drop another; no captions this time
    Path(rows[1]["uri"]).write_bytes(b"re-encoded" * 300)
    rows_2 = [rows[0], row_for(Path(rows[1]["uri"]), 1)]
    manifest_2 = write_manifest(tmp_path, rows_2, "manifest_2.parquet")
    second = version.run(cfg, tmp_path / "w2", manifest=manifest_2)
    assert second.values["dataset_rev"] != first.values["dataset_rev"]
    assert second.values["dataset_md5"] != first.values["dataset_md5"]
    assert second.values["num_clips"] == 2

    if drop_cache:  # force the old objects to come back from the remote
        shutil.rmtree(version.dataset_repo() / ".dvc" / "cache")
    out = version.checkout(cfg, first.values["dataset_rev"], tmp_path / "restored_1")
    assert snapshot(out) == expected
    out = version.checkout(cfg, second.values["dataset_rev"][:10], tmp_path / "restored_2")
    assert sorted(snapshot(out)) == sorted(
        ["manifest.parquet"] + [f"clips/{r['clip_id']}.mp4" for r in rows_2]
    )
    assert (
        version.dataset_md5(version.dataset_repo(), first.values["dataset_rev"])
        == (first.values["dataset_md5"])
    )


def check_versioned_manifest(uri: str, result, expected: dict[str, bytes]) -> None:
    """The manifest training reads: every clip from its DVC object (the same bytes), where it
    came from kept, and the revision in its metadata, down to the versioned manifest itself."""
    table = mf.read_table(uri)
    lineage = mf.lineage_of(table)
    assert lineage.dataset_rev == result.values["dataset_rev"]
    assert lineage.dataset_md5 == result.values["dataset_md5"]
    assert storage.read_bytes(lineage.manifest) == expected["manifest.parquet"]
    for row in table.to_pylist():
        assert "/files/md5/" in row["uri"] and row["source_uri"].endswith(".mp4")
        assert storage.read_bytes(row["uri"]) == expected[f"clips/{row['clip_id']}.mp4"]
    assert mf.read_lineage(uri) == lineage


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_round_trip_local_remote(tmp_path, home):
    round_trip(TesseraConfig(), tmp_path, drop_cache=True)
    assert any((home / "dvc-remote").rglob("*"))  # objects were pushed to the default remote
    log = subprocess.run(
        ["git", "-C", str(home / "dataset"), "log", "--oneline"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert len(log.splitlines()) == 3  # init + two dataset revisions


def test_checkout_errors(tmp_path, home):
    with pytest.raises(version.VersionError, match="no dataset repository"):
        version.checkout(TesseraConfig(), "HEAD", tmp_path / "out")
    rows = write_clips(tmp_path, n=1)
    version.run(
        TesseraConfig(), tmp_path / "w", manifest=write_manifest(tmp_path, rows, "m.parquet")
    )
    with pytest.raises(version.VersionError, match="not found"):
        version.checkout(TesseraConfig(), "deadbeef", tmp_path / "out")
    with pytest.raises(version.VersionError, match="holds no dataset"):
        version.checkout(TesseraConfig(), "HEAD~1", tmp_path / "out")  # the `dvc init` commit
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(version.VersionError, match="not empty"):
        version.checkout(TesseraConfig(), "HEAD", tmp_path / "busy")


class TestVersionStep(StepTesterMixin):
    step = version.STEP
    bad_config = ("version.remote=3",)
    bad_config_error = "version.remote: expected a string"

    @pytest.fixture(scope="class")
    def step_inputs(self, tmp_path_factory):
        root = tmp_path_factory.mktemp("version")
        return {"manifest": write_manifest(root, write_clips(root), "manifest.parquet")}

    def test_the_run_is_tagged_with_its_revision(self, step_run):
        import mlflow

        from components.core import tracking

        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        run = client.get_run(step_run.outputs["mlflow_run_id"])
        assert run.data.tags["tessera.dataset_rev"] == step_run.outputs["dataset_rev"]
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["tessera-dataset"]


@pytest.fixture
def s3_endpoint(monkeypatch):
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage._client.cache_clear()
    storage.s3_client().create_bucket(Bucket="tessera-data")
    yield endpoint
    storage._client.cache_clear()
    server.stop()


def test_round_trip_s3_remote(tmp_path, home, s3_endpoint):
    cfg = TesseraConfig(version=VersionConfig(remote="s3://tessera-data/dvc"))
    round_trip(cfg, tmp_path, drop_cache=True)
    keys = [o.uri for o in storage.list_objects("s3://tessera-data/dvc")]
    assert keys, "nothing was pushed to the S3 remote"
