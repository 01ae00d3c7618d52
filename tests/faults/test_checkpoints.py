"""Checkpoints as a trust boundary: a half-written, corrupt or planted checkpoint is detected
before DeepSpeed unpickles anything, and training resumes from the last good one."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from components.core import trainer
from tests.components.core.test_trainer import _payload, _run

pytestmark = pytest.mark.fault("security: pickles and damaged checkpoints")

MODEL_STATES = "mp_rank_00_model_states.pt"


class _Planted:
    """Unpickling this creates ``marker``: proof that a payload ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mknod, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Planted(marker)))
    # the payload is live: the same pickle, aimed at a probe file, runs under a plain unpickle
    probe, twin = marker.with_name("probe"), path.with_name("twin.pkl")
    twin.write_bytes(pickle.dumps(_Planted(probe)))
    code = f"import pickle; pickle.loads(open({str(twin)!r}, 'rb').read())"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert probe.exists()
    twin.unlink()


def _sealed(tmp_path: Path, name: str = "d") -> Path:
    path = tmp_path / name / "step-0000003"
    path.mkdir(parents=True)
    (path / MODEL_STATES).write_bytes(b"weights")
    (path / "rng_rank0.pt").write_bytes(b"rng")
    trainer.seal_checkpoint(path, {"step": 3, "samples": 12})
    return path


def test_a_sealed_checkpoint_verifies_and_lists_its_files(tmp_path):
    path = _sealed(tmp_path)
    body = trainer.verify_checkpoint(path)
    assert body["step"] == 3 and sorted(body["files"]) == [MODEL_STATES, "rng_rank0.pt"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: (p / "COMPLETE").write_text('{"step": 3, "fil'), "half-written"),
        (lambda p: (p / "COMPLETE").unlink(), "missing"),
        (lambda p: (p / "COMPLETE").write_text('{"step": 3}'), "older Tessera"),
        (lambda p: (p / MODEL_STATES).write_bytes(b"weightz"), "does not match its sealed"),
        (lambda p: (p / MODEL_STATES).unlink(), f"{MODEL_STATES} is missing"),
        (lambda p: (p / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x"), "not list"),
    ],
)
def test_damaged_checkpoints_are_refused_with_the_reason(tmp_path, damage, reason):
    path = _sealed(tmp_path)
    damage(path)
    with pytest.raises(trainer.CheckpointRefused, match=reason):
        trainer.verify_checkpoint(path)


def test_with_a_key_only_seals_signed_with_it_verify(tmp_path, monkeypatch):
    unsigned = _sealed(tmp_path, "unsigned")
    monkeypatch.setenv("TESSERA_CHECKPOINT_KEY", "k1")
    signed = _sealed(tmp_path, "signed")
    trainer.verify_checkpoint(signed)
    with pytest.raises(trainer.CheckpointRefused, match="not signed with this"):
        trainer.verify_checkpoint(unsigned)
    monkeypatch.setenv("TESSERA_CHECKPOINT_KEY", "k2")
    with pytest.raises(trainer.CheckpointRefused, match="not signed with this"):
        trainer.verify_checkpoint(signed)
    # a disk writer without the key re-seals a planted file: still refused
    monkeypatch.setenv("TESSERA_CHECKPOINT_KEY", "k1")
    (signed / MODEL_STATES).write_bytes(b"planted")
    body = json.loads((signed / "COMPLETE").read_text())
    body["files"][MODEL_STATES] = trainer._sha256(signed / MODEL_STATES)
    (signed / "COMPLETE").write_text(json.dumps(body))
    with pytest.raises(trainer.CheckpointRefused, match="not signed with this"):
        trainer.verify_checkpoint(signed)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["planted_pickle", "half_written_seal"])
def test_resume_skips_a_bad_latest_checkpoint_and_never_unpickles_it(tmp_path, fault):
    """A real DeepSpeed run checkpoints at steps 3 and 6 and is "killed"; the step-6 checkpoint
    is then replaced by a malicious pickle or its seal cut short. The retry warns, resumes from
    step 3 and ends on the uninterrupted trajectory; the payload never runs."""
    full = _run(tmp_path, _payload(tmp_path, "full", steps=9), 1)
    split = _payload(tmp_path, "split", steps=9)
    _run(tmp_path, {**split, "stop_at": 6}, 1)
    latest = Path(split["checkpoint_dir"]) / "step-0000006"
    marker = tmp_path / "payload-ran"
    if fault == "planted_pickle":
        plant(latest / MODEL_STATES, marker)
    else:
        seal = (latest / "COMPLETE").read_text()
        (latest / "COMPLETE").write_text(seal[: len(seal) // 2])
    resumed = _run(tmp_path, split, 1)
    assert not marker.exists()
    log = (tmp_path / "logs" / "train.log").read_text()
    assert f"skipping checkpoint {latest}" in log
    assert "resumed from checkpoint" in log and "step-0000003 at step 3" in log
    assert resumed["losses"] == pytest.approx(full["losses"][3:], rel=1e-5)
    assert resumed["weight"] == pytest.approx(full["weight"], rel=1e-5)
