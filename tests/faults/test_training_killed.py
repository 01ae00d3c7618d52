"""Training SIGKILLed mid-run, as a pre-empted node is: the launch fails naming the signal, and
the retry resumes from the last committed checkpoint and ends where an uninterrupted run ends.

The kill is the fault site ``train.sigkill.<checkpoint folder>.step-N`` (``components.core.faults``):
the rank that has just committed checkpoint N SIGKILLs itself, so the kill lands at the same step
every time (a watcher killing from outside, as ``tests/integration/test_scheduler.py`` does under
Airflow, races the run's end on models this small).

Tolerances: the DiT resumes bit-for-bit up to inductor's reductions (losses rel 1e-5, weights
``COMPILED_WEIGHTS``); the VAE (eager) up to float reassociation (rel 1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch

from components.core import faults, storage, trainer
from components.core.config import load_config
from tests.components.steps import test_train_dit as dit_tests
from tests.components.steps import test_train_vae as vae_tests

# the reference DiT run is made once per session and shared with test_train_dit (a file lock)
latents, one_process_run, manifest = (
    dit_tests.latents,
    dit_tests.one_process_run,
    vae_tests.manifest,
)

pytestmark = [pytest.mark.slow, pytest.mark.fault("fault: training killed")]


def _kill_at(monkeypatch, tmp_path, folder: str, step: int) -> None:
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))  # the fault's counter lives here
    monkeypatch.setenv(faults.ENV, f"train.sigkill.{folder}.step-{step:07d}")


def _resumed_line(log: str) -> str:
    (line,) = [line for line in log.splitlines() if "resumed from checkpoint" in line]
    return line


def test_a_killed_dit_resumes_and_matches_the_uninterrupted_run(
    latents, one_process_run, tmp_path, monkeypatch
):
    one, one_dir = one_process_run
    cfg = dit_tests.tiny_cfg(*dit_tests.EQUIVALENCE, "train_dit.train.grad_accum=2")
    _kill_at(monkeypatch, tmp_path, "split-ckpt", 3)
    with pytest.raises(trainer.TrainingFailed, match="exit code"):
        dit_tests._launch(tmp_path, "split", cfg, latents)
    assert (tmp_path / "split-ckpt" / "step-0000003" / "COMPLETE").exists()
    assert not (tmp_path / "split-ckpt" / "step-0000006").exists()
    assert not (tmp_path / "split" / "dit").exists()  # no output from the killed run
    second = dit_tests._launch(tmp_path, "split", cfg, latents)  # the retry (the fault is used up)
    assert "at step 3" in _resumed_line((tmp_path / "split.log").read_text())
    assert second["finished"] and second["steps"] == 6
    assert second["losses"] == pytest.approx(one["losses"], rel=1e-5)  # history survives
    assert [s for s, _ in second["val"]] == [s for s, _ in one["val"]] == [0, 3, 6]
    assert [v for _, v in second["val"]] == pytest.approx([v for _, v in one["val"]], rel=1e-5)
    a, b = dit_tests._weights(one_dir), dit_tests._weights(tmp_path / "split" / "dit")
    for key in a:
        torch.testing.assert_close(b[key], a[key], **dit_tests.COMPILED_WEIGHTS, msg=key)


def test_a_killed_vae_resumes_and_matches_the_uninterrupted_run(manifest, tmp_path, monkeypatch):
    cfg = load_config(
        "tiny",
        [
            *vae_tests.TINY,
            "train_vae.train.steps=6",
            "train_vae.train.log_every=1",
            "train_vae.train.checkpoint_every=3",
            "train_vae.disc_weight=0.1",
            "train_vae.disc_start=1",
            "train_vae.disc_channels=8",
        ],
    )
    whole = vae_tests._launch(cfg, manifest, tmp_path / "whole")
    _kill_at(monkeypatch, tmp_path, "ckpt", 3)
    with pytest.raises(trainer.TrainingFailed, match="exit code"):
        vae_tests._launch(cfg, manifest, tmp_path / "split")
    assert (tmp_path / "split" / "ckpt" / "step-0000003" / "COMPLETE").exists()
    assert not (tmp_path / "split" / "vae").exists()
    second = vae_tests._launch(cfg, manifest, tmp_path / "split")
    assert "at step 3" in _resumed_line((tmp_path / "split" / "train.log").read_text())
    assert [h["step"] for h in second["history"]] == [4, 5, 6]  # not started over
    resumed = {h["step"]: h["loss"] for h in second["history"]}
    reference = {h["step"]: h["loss"] for h in whole["history"] if h["step"] > 3}
    assert resumed == pytest.approx(reference, rel=1e-5)
    positions = [p for h in whole["history"] if h["step"] > 3 for p in h["positions"]]
    assert [p for h in second["history"] for p in h["positions"]] == positions  # same data
    a, b = whole["result"], second["result"]
    for key in ("final_loss", "val_psnr", "holdout_psnr", "latent_scale"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    saved = [
        json.loads((tmp_path / d / "vae" / "config.json").read_text()) for d in ("whole", "split")
    ]
    assert saved[1]["scaling_factor"] == pytest.approx(saved[0]["scaling_factor"], rel=1e-5)


def test_a_killed_sweep_point_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    """A sweep point is a train_dit run into ``checkpoints/<run>/sweep/<key>``: killed after its
    checkpoint 3, the retry of that point alone resumes there and ends as an uninterrupted run of
    the same point (another pipeline run) ends."""
    from components.core import runner
    from components.core.runner import RunContext
    from components.steps import sweep
    from tests.testing_utils.data import write_fake_latents

    latents_uri = write_fake_latents(tmp_path / "latents")
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    cfg = load_config(
        "tiny", [*dit_tests.TINY, "sweep.budgets=[4e8]", "train_dit.train.checkpoint_every=3"]
    )

    def point(run_id: str) -> tuple[RunContext, dict]:
        ctx = RunContext(run_id, "cli", None, track=False)
        (row,) = runner.plan_parts(sweep.STEP, cfg, ctx, latents=latents_uri)
        return ctx, row

    ref_ctx, row = point("sweep-reference")
    reference = runner.run_part(sweep.STEP, cfg, ref_ctx, row, latents=latents_uri)
    assert row["steps"] >= 6, row
    ctx, row = point("sweep-killed")
    monkeypatch.setenv(faults.ENV, f"train.sigkill.{row['key']}.step-0000003")
    with pytest.raises(trainer.TrainingFailed, match="exit code"):
        runner.run_part(sweep.STEP, cfg, ctx, row, latents=latents_uri)
    ckpt = tmp_path / "home" / "checkpoints" / ctx.run_id / "sweep" / row["key"]
    assert (ckpt / "step-0000003" / "COMPLETE").exists()
    assert not storage.exists(runner.part_uri(cfg, ctx.run_id, "sweep", row))  # nothing committed
    resumed = runner.run_part(sweep.STEP, cfg, ctx, row, latents=latents_uri)
    assert "at step 3" in _resumed_line((ckpt / "train_dit.log").read_text())
    assert resumed["steps"] == reference["steps"] == row["steps"]
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert resumed["train_flops"] == pytest.approx(reference["train_flops"], rel=1e-9)
