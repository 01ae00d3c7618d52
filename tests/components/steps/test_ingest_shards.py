"""Ingest in shards: plan → one committed part per shard → merge equals one pass, byte for byte."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from components.core import storage
from components.core.runner import OUTPUTS, RunContext, plan_parts, run_part, run_step
from components.steps import ingest
from components.steps.ingest import listing
from tests.components.steps.test_ingest import BAD, GOOD, corpus, encode_video, make_cfg

__all__ = ["corpus"]  # the module fixture of test_ingest: the same real files

VALUES = ("seen", "ingested", "quarantined", "duplicates", "reused", "reasons")
TABLES = ("manifest", "quarantine")


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory) -> Path:
    """test_ingest's corpus plus copies that land in later shards than their originals."""
    src = tmp_path_factory.mktemp("sharded") / "raw"
    shutil.copytree(corpus, src)
    for name in ("o_landscape_again.mp4", "p_landscape_again.mp4", "sub/y_landscape.mp4"):
        shutil.copy2(corpus / "a_landscape.mp4", src / name)  # accepted original in shard 0
    shutil.copy2(corpus / "f_wide.mp4", src / "q_wide_again.mp4")  # copy of a rejected clip
    shutil.copy2(corpus / "h_cut.mp4", src / "r_cut_again.mp4")  # copy of a corrupt file
    return src


def files_under(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def single_pass(tmp_path: Path, src: str, **inputs) -> dict:
    cfg = make_cfg(tmp_path / "single")  # a store of its own: no latest ingest to reuse
    return run_step(ingest.STEP, cfg, RunContext("single", track=False), src=src, **inputs)


def in_shards(tmp_path: Path, src: str, shard_files: int, monkeypatch, **inputs):
    """(planned parts, their outputs, the merged step's outputs, cfg, ctx)."""
    cfg = make_cfg(tmp_path / "sharded", shard_size=shard_files)
    ctx = RunContext("sharded", track=False)
    planned = plan_parts(ingest.STEP, cfg, ctx, src=src, **inputs)
    parts = [run_part(ingest.STEP, cfg, ctx, part, src=src, **inputs) for part in planned]
    merged = run_step(ingest.STEP, cfg, ctx, parts=parts)
    return planned, parts, merged, cfg, ctx


def table(outputs: dict, name: str) -> pd.DataFrame:
    return pq.read_table(storage.local_path(outputs[name])).to_pandas()


def assert_same_ingest(merged: dict, single: dict) -> None:
    """Same tables (rows, columns, order, bytes) and the same counts as one pass."""
    for name in TABLES:
        pd.testing.assert_frame_equal(table(merged, name), table(single, name))
        got = storage.read_bytes(merged[name])
        assert got == storage.read_bytes(single[name]), f"{name} differs in bytes"
    assert {k: merged[k] for k in VALUES} == {k: single[k] for k in VALUES}


def uris_of(outputs: dict) -> list[str]:
    return [u for name in TABLES for u in table(outputs, name)["uri"]]


# --------------------------------------------------------------------------- local directory


@pytest.mark.parametrize("shard_files", [1, 4, 1000])
def test_shards_merge_into_the_single_pass_manifest(source, tmp_path, monkeypatch, shard_files):
    single = single_pass(tmp_path, str(source))
    planned, parts, merged, _, _ = in_shards(tmp_path, str(source), shard_files, monkeypatch)
    total = len(files_under(source))
    assert len(planned) == math.ceil(total / shard_files)
    expected = [min(shard_files, total - start) for start in range(0, total, shard_files)]
    assert [p["files"] for p in planned] == expected
    assert_same_ingest(merged, single)
    # every file is accounted for exactly once: by one part, then in one of the two tables
    assert sum(p["seen"] for p in parts) == merged["seen"] == total
    assert sorted(uris_of(merged)) == files_under(source)
    part_uris = [u for p in parts for name in TABLES for u in table(p, name)["uri"]]
    assert sorted(part_uris) == files_under(source)


def test_duplicates_across_shards_name_the_first_copy(source, tmp_path, monkeypatch):
    _, parts, merged, _, _ = in_shards(tmp_path, str(source), 4, monkeypatch)
    first = str(source / "a_landscape.mp4")
    # the parts alone accepted later copies (their original is in another shard) ...
    accepted = [u for p in parts for u in table(p, "manifest")["uri"]]
    assert str(source / "o_landscape_again.mp4") in accepted
    # ... the merge makes each one a duplicate of the first copy, as one pass does
    quarantine = table(merged, "quarantine").set_index("uri")
    for name in (
        "a_landscape_copy.mp4",
        "o_landscape_again.mp4",
        "p_landscape_again.mp4",
        "sub/y_landscape.mp4",
    ):
        row = quarantine.loc[str(source / name)]
        assert row["reason"] == "duplicate" and f"as {first})" in row["message"], name
    # a copy of a rejected clip is rejected for the same reason, not called a duplicate
    assert quarantine.loc[str(source / "q_wide_again.mp4"), "reason"] == "resolution_out_of_bounds"
    assert quarantine.loc[str(source / "r_cut_again.mp4"), "reason"] == "corrupt"
    assert merged["duplicates"] == 4
    assert merged["ingested"] == len(GOOD)
    assert merged["quarantined"] == len(BAD) + 5


def test_captions_are_joined_once_over_all_shards(source, tmp_path, monkeypatch):
    import pyarrow as pa

    captions = tmp_path / "captions.parquet"
    rows = [
        {"path": "a_landscape.mp4", "caption": "noise, landscape"},
        {"path": "o_landscape_again.mp4", "caption": "a duplicate's caption: never used"},
        {"path": "sub/z_nested.mp4", "caption": "nested noise"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), captions)
    single = single_pass(tmp_path, str(source), captions=str(captions))
    *_, merged, _, _ = in_shards(tmp_path, str(source), 3, monkeypatch, captions=str(captions))
    assert_same_ingest(merged, single)
    got = table(merged, "manifest").set_index("uri")["caption"].dropna().to_dict()
    assert got == {
        str(source / "a_landscape.mp4"): "noise, landscape",
        str(source / "sub/z_nested.mp4"): "nested noise",
    }


def test_shards_reuse_a_previous_ingest_like_one_pass(source, tmp_path, monkeypatch):
    first = single_pass(tmp_path, str(source))
    previous = storage.local_path(first["manifest"])
    again = single_pass(tmp_path / "again", str(source), previous=str(previous))
    *_, merged, _, _ = in_shards(tmp_path, str(source), 4, monkeypatch, previous=str(previous))
    for name in TABLES:  # same tables; "reused" may differ: see the note below
        assert storage.read_bytes(merged[name]) == storage.read_bytes(again[name]), name
    # a previous duplicate whose original sits in another shard is probed again by its shard
    assert 0 < merged["reused"] <= again["reused"]


# --------------------------------------------------------------------------- list file, S3


def test_list_file_shards_stat_only_their_own_entries(source, tmp_path, monkeypatch):
    entries = [
        "a_landscape.mp4",
        "b_portrait.mp4",
        "o_landscape_again.mp4",
        "k_notes.mp4",
        "gone.mp4",
        "sub/y_landscape.mp4",
        "d_still.png",
    ]
    clips = tmp_path / "clips.txt"
    lines = [f"{os.path.relpath(source / e, tmp_path)}" for e in entries]
    clips.write_text("# shard me\n" + "\n".join(lines + lines[:2]) + "\n")  # two listed twice
    single = single_pass(tmp_path, f"@{clips}")

    stated: list[str] = []
    real_stat = listing._stat_local
    monkeypatch.setattr(listing, "_stat_local", lambda p: stated.append(p) or real_stat(p))
    cfg = make_cfg(tmp_path / "sharded", shard_size=2)
    ctx = RunContext("sharded", track=False)
    planned = plan_parts(ingest.STEP, cfg, ctx, src=f"@{clips}")
    assert stated == [] and len(planned) == 4  # planning opened nothing, stat'ed nothing
    parts = []
    for part in planned:
        stated.clear()
        parts.append(run_part(ingest.STEP, cfg, ctx, part, src=f"@{clips}"))
        span = listing.Span(part["after"], part["through"])
        assert stated and all(span.holds(p) for p in stated), (part, stated)
        assert len(stated) == part["files"]
    merged = run_step(ingest.STEP, cfg, ctx, parts=parts)
    assert_same_ingest(merged, single)
    assert merged["seen"] == len(entries)
    assert merged["reasons"] == {"duplicate": 2, "missing": 1, "not_media": 1}


def test_s3_prefix_shards_page_from_their_own_keys(corpus, tmp_path, s3_env, monkeypatch):
    client, bucket = storage.s3_client(), s3_env
    names = [
        "a_landscape.mp4",
        "a_landscape_copy.mp4",
        "b_portrait.mp4",
        "h_cut.mp4",
        "k_notes.mp4",
        "sub/z_nested.mp4",
    ]
    for name in names:
        client.upload_file(str(corpus / name), bucket, f"raw/{name}")
    client.upload_file(str(corpus / "a_landscape.mp4"), bucket, "raw/sub/w_again.mp4")
    client.upload_file(str(corpus / "b_portrait.mp4"), bucket, "raw0/after_the_prefix.mp4")
    client.upload_file(str(corpus / "b_portrait.mp4"), bucket, "elsewhere/b_portrait.mp4")
    src = f"s3://{bucket}/raw"
    single = single_pass(tmp_path, src)
    full_listings = []
    real_list = storage.list_objects
    monkeypatch.setattr(storage, "list_objects", lambda p: full_listings.append(p) or real_list(p))
    planned, parts, merged, _, _ = in_shards(tmp_path, src, 3, monkeypatch)
    assert len(full_listings) == 2  # the plan's and the first shard's; the rest StartAfter
    keys = sorted(f"s3://{bucket}/raw/{n}" for n in [*names, "sub/w_again.mp4"])
    assert [(p["after"], p["through"]) for p in planned] == [
        (None, keys[2]),
        (keys[2], keys[5]),
        (keys[5], None),
    ]
    assert_same_ingest(merged, single)
    assert sorted(uris_of(merged)) == keys
    assert [p["seen"] for p in parts] == [3, 3, 1]
    assert merged["reasons"] == {"corrupt": 1, "duplicate": 2, "not_media": 1}


# --------------------------------------------------------------------------- the plan, parts


def test_plan_is_small_spans_that_cover_the_source(source, monkeypatch, tmp_path):
    planned = ingest.plan_shards(make_cfg(tmp_path, shard_size=5), str(source))
    assert all(set(p) == {"after", "through", "files"} for p in planned)
    assert planned[0]["after"] is None and planned[-1]["through"] is None
    for before, after in zip(planned, planned[1:], strict=False):
        assert before["through"] == after["after"]
    assert len(json.dumps(planned)) < 200 * len(planned)  # XCom-sized: no per-file lists
    (tmp_path / "empty").mkdir()
    assert ingest.plan_shards(make_cfg(tmp_path), str(tmp_path / "empty")) == [
        {"after": None, "through": None, "files": 0}
    ]


def test_a_file_added_after_planning_lands_in_exactly_one_shard(corpus, tmp_path, monkeypatch):
    src = tmp_path / "raw"
    src.mkdir()
    for name in ("a_landscape.mp4", "b_portrait.mp4", "e_one_frame.mp4", "k_notes.mp4"):
        shutil.copy2(corpus / name, src / name)
    cfg = make_cfg(tmp_path, shard_size=2)
    ctx = RunContext("late", track=False)
    planned = plan_parts(ingest.STEP, cfg, ctx, src=str(src))
    encode_video(src / "a_late.mp4", 32, 32, seed=42)  # inside the first shard's span
    parts = [run_part(ingest.STEP, cfg, ctx, part, src=str(src)) for part in planned]
    merged = run_step(ingest.STEP, cfg, ctx, parts=parts)
    assert [p["seen"] for p in parts] == [3, 2] and merged["seen"] == 5
    assert sorted(uris_of(merged)) == files_under(src)


def _refuse(*args, **kwargs):
    raise AssertionError("a committed part ran again")


def test_rerunning_a_committed_part_is_a_no_op(source, tmp_path, monkeypatch):
    planned, parts, merged, cfg, ctx = in_shards(tmp_path, str(source), 8, monkeypatch)
    refusing = dataclasses.replace(ingest.STEP, run=_refuse, part=_refuse)
    for part, outputs in zip(planned, parts, strict=True):
        recorded = storage.join(outputs["step_uri"], OUTPUTS)
        before = storage.read_bytes(recorded)
        assert run_part(refusing, cfg, ctx, part, src=str(source)) == outputs
        assert storage.read_bytes(recorded) == before
    assert run_step(refusing, cfg, ctx, parts=parts) == merged


def test_merge_refuses_parts_of_different_plans(source, tmp_path, monkeypatch):
    _, parts, _, cfg, _ = in_shards(tmp_path, str(source), 8, monkeypatch)
    (tmp_path / "work").mkdir()
    with pytest.raises(ValueError, match="overlap or are out of order"):
        ingest.run(cfg, tmp_path / "work", parts=[parts[0], {**parts[0], "index": 9}])
    with pytest.raises(ValueError, match="different sources"):
        ingest.run(cfg, tmp_path / "work", parts=[parts[0], {**parts[1], "src": "/elsewhere"}])
