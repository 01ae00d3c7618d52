"""Validate step: GX suite passes a clean manifest, quarantines a few bad rows, fails on many."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from components.core import manifest as mf
from components.core.config import TesseraConfig
from components.steps import validate
from tests.testing_utils.step_tester import StepTesterMixin

CFG = TesseraConfig()


def make_rows(n: int = 40) -> list[dict]:
    """``n`` plausible manifest rows: videos and a few stills, 1 in 10 in the val split."""
    rows = []
    for i in range(n):
        image = i % 8 == 7
        rows.append(
            {
                "clip_id": f"{i:064x}",
                "uri": f"/data/raw/clip_{i:03d}.{'png' if image else 'mp4'}",
                "bytes": 1000 + i,
                "container": "png" if image else "mp4",
                "codec": "png" if image else "h264",
                "width": 160,
                "height": 90 if i % 3 else 160,
                "fps": 0.0 if image else 24.0,
                "num_frames": 1 if image else 25,
                "duration_s": 0.0 if image else 25 / 24,
                "split": "val" if i % 10 == 0 else "train",
                "caption": None if i % 4 == 0 else f"a red ball bouncing, take {i}",
                "caption_source": None if i % 4 == 0 else "given",
                "short_caption": None,
                "kind": "image" if image else "video",
                "has_audio": False,
                "rotation": 0,
                "frames_counted": True,
                "source_version": f"{1000 + i}:{i}",
            }
        )
    return rows


def write_manifest(tmp_path, rows, schema: pa.Schema = mf.MANIFEST_SCHEMA) -> str:
    uri = str(tmp_path / "in" / "manifest.parquet")
    mf.write_table(mf.table_from_rows(rows, schema), uri)
    return uri


def data_docs(docs: Path) -> tuple[str, str]:
    """(index page, the one validation page) of a Data Docs site, as plain text; the index must
    link the validation page."""
    (page,) = (docs / "validations").rglob("*.html")
    index = (docs / "index.html").read_text()
    assert page.relative_to(docs).as_posix() in index
    return _text(index), _text(page.read_text())


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


class TestValidateStep(StepTesterMixin):
    step = validate.STEP
    bad_config = ("validate.fps_range=[1]",)
    bad_config_error = r"validate.fps_range: expected 2 items"

    @pytest.fixture(scope="class")
    def step_inputs(self, tmp_path_factory):
        return {"manifest": write_manifest(tmp_path_factory.mktemp("validate"), make_rows())}

    def test_the_suite_passed(self, step_run):
        assert step_run.outputs["success"] is True
        assert step_run.outputs["rows_passed"] == step_run.outputs["rows_in"] == 40


def test_clean_manifest_passes_and_publishes_data_docs(tmp_path):
    rows = make_rows()
    uri = write_manifest(tmp_path, rows)
    out = tmp_path / "out"
    out.mkdir()
    result = validate.run(CFG, out, manifest=uri)

    assert result.values["success"] is True
    assert result.values["rows_in"] == result.values["rows_passed"] == len(rows)
    assert result.values["rows_quarantined"] == 0
    assert result.values["failed_expectations"] == 0
    assert result.values["evaluated_expectations"] == len(
        validate.build_suite(CFG.validate).expectations
    )
    passed = mf.read_table(str(out / result.files["manifest"]))
    assert passed.schema.equals(mf.MANIFEST_SCHEMA)
    assert passed.column("clip_id").to_pylist() == [r["clip_id"] for r in rows]
    assert mf.read_table(str(out / result.files["quarantine"])).num_rows == 0
    index, page = data_docs(out / "data_docs")
    assert validate.SUITE_NAME in index
    suite_size = len(validate.build_suite(CFG.validate).expectations)
    assert f"Evaluated Expectations {suite_size} Successful Expectations {suite_size} " in page
    assert "Unsuccessful Expectations 0" in page and "Status: Succeeded" in page
    for column in ("clip_id", "fps", "caption_source", "split"):
        assert column in page
    report = json.loads((out / "validation_result.json").read_text())
    assert report["summary"]["suite_version"] == validate.SUITE_VERSION
    assert report["summary"]["val_fraction"] == pytest.approx(0.1)
    for rel in result.artifacts:
        assert (out / rel).exists()


def test_suite_is_versioned_and_classified():
    suite = validate.build_suite(CFG.validate)
    assert suite.name == validate.SUITE_NAME
    assert suite.meta["tessera_suite_version"] == validate.SUITE_VERSION
    severities = {
        validate.expectation_name(e.configuration.to_json_dict()): e.severity
        for e in suite.expectations
    }
    assert severities["expect_column_values_to_be_unique:clip_id"] == "critical"
    assert severities["expect_column_mean_to_be_between:is_val"] == "critical"
    assert severities["expect_column_values_to_be_between:fps"] == "warning"


def test_few_bad_rows_are_quarantined(tmp_path):
    rows = make_rows()
    rows[3]["fps"] = 0.0  # a video with no frame rate
    rows[3]["caption"] = "ab"  # and a too-short caption: both reasons in the message
    rows[5]["caption_source"] = "hallucinated"
    uri = write_manifest(tmp_path, rows)
    old_q = str(tmp_path / "in" / "quarantine.parquet")
    ingest_row = {
        "uri": "/data/raw/empty.mp4",
        "reason": "zero_bytes",
        "message": "the file is empty",
        "bytes": 0,
        "step": "ingest",
    }
    mf.write_table(mf.table_from_rows([ingest_row], mf.QUARANTINE_SCHEMA), old_q)
    out = tmp_path / "out"
    out.mkdir()
    result = validate.run(CFG, out, manifest=uri, quarantine=old_q)

    assert result.values["success"] is True
    assert result.values["rows_quarantined"] == 2
    assert result.values["rows_passed"] == len(rows) - 2
    passed = mf.read_table(str(out / "manifest.parquet"))
    expected = [r["clip_id"] for i, r in enumerate(rows) if i not in (3, 5)]
    assert passed.column("clip_id").to_pylist() == expected
    q = mf.read_table(str(out / "quarantine.parquet")).to_pylist()
    assert [r["reason"] for r in q] == [
        "zero_bytes",
        "expect_column_values_to_be_between:fps",
        "expect_column_values_to_be_in_set:caption_source",
    ]
    assert q[1]["uri"] == rows[3]["uri"] and q[1]["step"] == "validate"
    assert q[1]["sha256"] == rows[3]["clip_id"] and q[1]["bytes"] == rows[3]["bytes"]
    assert "fps=0.0" in q[1]["message"] and "caption has 2 characters" in q[1]["message"]
    assert "hallucinated" in q[2]["message"]


def test_many_bad_rows_fail_with_readable_message(tmp_path):
    rows = make_rows()
    for i in range(0, 20, 2):
        if rows[i]["kind"] == "video":
            rows[i]["fps"] = 500.0
    uri = write_manifest(tmp_path, rows)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(validate.ValidationFailed) as info:
        validate.run(CFG, out, manifest=uri)
    message = str(info.value)
    assert "expect_column_values_to_be_between:fps" in message
    assert "fps=500.0" in message and rows[0]["uri"] in message
    assert "validate.mostly" in message
    assert isinstance(info.value, RuntimeError)


def test_duplicate_clip_id_is_critical(tmp_path):
    rows = make_rows()
    rows[7]["clip_id"] = rows[6]["clip_id"]
    uri = write_manifest(tmp_path, rows)
    with pytest.raises(validate.ValidationFailed) as info:
        validate.run(CFG, tmp_path, manifest=uri)
    message = str(info.value)
    assert "[critical] expect_column_values_to_be_unique:clip_id" in message
    assert "2 of 40 rows" in message and rows[6]["clip_id"] in message


def test_missing_column_is_critical(tmp_path):
    schema = pa.schema([f for f in mf.MANIFEST_SCHEMA if f.name != "fps"])
    rows = [{k: v for k, v in r.items() if k != "fps"} for r in make_rows()]
    uri = write_manifest(tmp_path, rows, schema)
    with pytest.raises(validate.ValidationFailed) as info:
        validate.run(CFG, tmp_path, manifest=uri)
    first = info.value.failures[0]
    assert first["name"] == "expect_table_columns_to_match_set:table"
    assert "missing columns ['fps']" in str(info.value).splitlines()[1]


def test_val_fraction_out_of_range_is_critical(tmp_path):
    rows = make_rows()
    for r in rows[:30]:
        r["split"] = "val"
    uri = write_manifest(tmp_path, rows)
    with pytest.raises(validate.ValidationFailed, match="expect_column_mean_to_be_between:is_val"):
        validate.run(CFG, tmp_path, manifest=uri)
