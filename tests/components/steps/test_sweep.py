"""The compute sweep: a plan from the analytic FLOP count, one real DeepSpeed train_dit run per
row (nested MLflow runs), the law fitted over them and the best run selected."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from components.core import faults, runner, storage, tracking
from components.core.config import ConfigError, load_config
from components.core.runner import RunContext
from components.steps import sweep
from components.steps.sweep.plan import plan_sweep, point_config, table, workload
from components.steps.train_dit import data as dit_data
from model.dit import DiT
from tests.components.steps.test_train_dit import TINY, tiny_cfg
from tests.testing_utils.data import write_fake_latents
from tests.testing_utils.step_tester import StepTesterMixin

BUDGETS = "sweep.budgets=[6e8,2e9,6e9]"  # ~23, 76 and 227 steps of tessera-tiny


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> str:
    return write_fake_latents(tmp_path_factory.mktemp("latents"))


@pytest.fixture(scope="module")
def work(latents):
    return workload(tiny_cfg(), latents)


# --------------------------------------------------------------------------- the plan


def test_the_plan_spends_each_budget_and_replans_the_same_rows(work):
    cfg = tiny_cfg("sweep.budgets=[3e11,1e12]", "sweep.sizes=[tessera-tiny,tessera-xs]")
    rows = plan_sweep(cfg, work, peak_gflops=100.0)
    assert rows == plan_sweep(cfg, work, peak_gflops=100.0)  # a pure function: same rows
    assert len(rows) == 4 and len({r.key for r in rows}) == 4
    for row in rows:
        assert row.planned_flops == pytest.approx(row.budget, rel=0.05)
        assert row.planned_flops == pytest.approx(row.steps * row.flops_per_step)
        assert row.expected_s == pytest.approx(row.planned_flops / (100e9 * 0.2))
    tiny = [r for r in rows if r.size == "tessera-tiny"]
    xs = [r for r in rows if r.size == "tessera-xs"]
    assert [r.budget for r in tiny] == [3e11, 1e12] and tiny[0].params < xs[0].params
    assert all(a.steps > b.steps for a, b in zip(tiny, xs, strict=True))  # bigger: fewer steps
    assert "| native-original-tessera-xs-1e12 |" in table(rows)
    # the smallest budget buys < min_steps at the profile's 128-token packs: its packs shrink
    cfg = tiny_cfg("sweep.budgets=[4e8,4e9]", "sweep.min_steps=20")
    small, large = plan_sweep(cfg, work, peak_gflops=100.0)
    assert (
        small.token_budget == 80 < large.token_budget == 128 and small.steps >= 20
    )  # 80: the largest clip


def test_a_budget_too_small_for_any_pack_says_how_much_it_needs(work):
    with pytest.raises(ConfigError, match=r"Raise the budget to at least [0-9.e+]+ or lower"):
        plan_sweep(tiny_cfg("sweep.budgets=[1e7]"), work, peak_gflops=100.0)


def test_without_budgets_the_plan_is_the_profiles_single_run(work):
    cfg = tiny_cfg("sweep.budgets=[]")
    (row,) = plan_sweep(cfg, work, peak_gflops=100.0)
    assert row.steps == cfg.train_dit.train.steps and row.key.endswith(f"-s{row.steps}")


def test_variants_are_rows_of_their_own_at_the_same_compute(work):
    cfg = tiny_cfg("sweep.budgets=[3e9]", "sweep.framings=[native,square_crop]")
    native, square = plan_sweep(cfg, work, peak_gflops=100.0)
    assert (native.framing, square.framing) == ("native", "square_crop")
    assert native.key != square.key and square.planned_flops == pytest.approx(3e9, rel=0.05)
    # square crops shrink the 2:1 clips, so more of them fill the same packs
    assert square.flops_per_step == pytest.approx(native.flops_per_step, rel=0.1)
    point = point_config(cfg, square.to_dict())
    assert point.train_dit.framing == "square_crop" and point.train_dit.train.steps == square.steps
    assert point.train_dit.eval_every == square.steps and point.train_dit.sample_every == 0


def test_variant_training_sets(latents):
    from components.core.latents import read_index

    index = read_index(latents)
    train, _, _ = dit_data.split_clips(index, 2)
    data = dit_data.load_latents(latents, train)
    square = dit_data.apply_variant(data, "square_crop", "original")
    for before, after in zip(data.latents, square.latents, strict=True):
        side = min(before.shape[-2:])
        assert after.shape == (*before.shape[:2], side, side)
    short = dit_data.apply_variant(data, "native", "short")
    for i in range(len(data)):
        expected = data.short_texts[i] if data.short_texts[i] is not None else data.texts[i]
        assert torch.equal(short.texts[i], expected)
    with pytest.raises(ValueError, match="captions=recaptioned needs latents encoded"):
        dit_data.apply_variant(data, "native", "recaptioned")


def test_recaptioned_latents_train_on_either_caption():
    """Latents encoded after the caption step: ``recaptioned`` trains on the captioner's caption,
    ``original`` on the clip's own one, or the null condition where it came without one."""
    text = [torch.full((2, 4), float(i)) for i in range(3)]
    own = torch.full((3, 4), 9.0)
    data = dit_data.LatentSet(
        clip_ids=["a", "b", "c"],
        latents=[torch.zeros(4, 1, 2, 2)] * 3,
        texts=text,
        text_masks=[torch.ones(2, dtype=torch.bool)] * 3,
        kinds=["video"] * 3,
        captions=["x", "y", "z"],
        sources=["recaptioned", "recaptioned", "given"],  # c kept its own (the 5 % blend)
        original_texts=[own, None, None],  # b came without a caption
        original_masks=[torch.ones(3, dtype=torch.bool), None, None],
    )
    recaptioned = dit_data.apply_variant(data, "native", "recaptioned")
    assert all(torch.equal(a, b) for a, b in zip(recaptioned.texts, text, strict=True))
    original = dit_data.apply_variant(data, "native", "original")
    assert torch.equal(original.texts[0], own) and original.text_masks[0].all()
    assert not original.text_masks[1].any()  # the null condition
    assert torch.equal(original.texts[2], text[2])


def test_faults_fire_the_configured_number_of_times(tessera_home, monkeypatch):
    monkeypatch.setenv(faults.ENV, "a.site:2, other")
    faults.check("unnamed.site")  # not named: nothing happens
    for _ in range(2):
        with pytest.raises(faults.InjectedFault, match="a.site"):
            faults.check("a.site")
    faults.check("a.site")  # used up (counted on disk: a retry in a new process sees it)


# --------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
class TestSweepStep(StepTesterMixin):
    step = sweep.STEP
    overrides = (*TINY, BUDGETS)
    bad_config = ("sweep.sizes=[tessera-huge]",)
    bad_config_error = "unknown DiT size 'tessera-huge'"

    @pytest.fixture(scope="class")
    def step_inputs(self, latents):
        return {"latents": latents}

    def test_loss_falls_with_compute_and_the_law_is_fitted(self, step_run):
        out = step_run.outputs
        result = json.loads(storage.read_text(out["result"]))
        points = sorted(result["points"], key=lambda p: p["budget"])
        assert [p["budget"] for p in points] == [6e8, 2e9, 6e9]
        losses = [p["val_loss"] for p in points]
        assert losses == sorted(losses, reverse=True)  # more compute, lower validation loss
        for p in points:  # measured FLOPs (what ran) near the plan (text dropout, pack fill)
            assert p["compute"] == pytest.approx(p["planned_flops"], rel=0.15)
        fit = result["fits"]["native/original"]
        assert fit["monotonic"] and fit["law"]["b"] > 0 and "holdout" not in fit
        assert any("holding out the largest needs >= 4" in n for n in fit["notes"])
        assert out["best"] == points[-1]["key"] and out["best_val_loss"] == losses[-1]
        assert storage.exists(storage.join(out["step_uri"], fit["plot"]))

    def test_the_best_point_is_a_complete_model(self, step_run):
        dit = DiT.from_pretrained(step_run.outputs["dit"])
        assert dit.config.in_channels == 4 and dit.config.text_dim == 16

    def test_each_point_is_a_nested_run_under_the_sweeps(self, step_run):
        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        sweep_run = client.get_run(step_run.outputs["mlflow_run_id"])
        names = [a.path for a in client.list_artifacts(sweep_run.info.run_id)]
        assert {sweep.PLAN_NAME, "sweep_plan.json", sweep.RESULT_NAME} <= set(names)
        children = client.search_runs(
            [sweep_run.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'",
        )
        assert len(children) == 3
        for child in children:
            tags = child.data.tags
            assert tags["tessera.step"] == sweep.POINT_STEP and child.info.status == "FINISHED"
            assert float(tags["tessera.sweep.budget"]) in (6e8, 2e9, 6e9)
            measured = float(tags["tessera.sweep.measured_flops"])
            assert measured == pytest.approx(float(tags["tessera.sweep.planned_flops"]), rel=0.15)
            assert "val_loss" in child.data.metrics

    def test_a_retriggered_sweep_trains_only_the_new_point(self, step_run):
        cfg = load_config("tiny", [*TINY, "sweep.budgets=[6e8,2e9,6e9,4e9]"])
        ctx = RunContext(step_run.ctx.run_id, "cli", None, track=False)
        rows = runner.plan_parts(sweep.STEP, cfg, ctx, latents=step_run.inputs["latents"])
        old = [r for r in rows if r["budget"] != 4e9]
        for row in old:  # committed: returned as recorded, not trained again
            done = runner.run_part(sweep.STEP, cfg, ctx, row, latents=step_run.inputs["latents"])
            assert done["point_run_id"] is not None  # from the tracked first run
        assert not storage.exists(runner.part_uri(cfg, ctx.run_id, "sweep", rows[-1]))


@pytest.mark.slow
@pytest.mark.fault("fault: re-runs")
def test_a_point_failure_is_retried_alone_and_resumes(tessera_home, latents, monkeypatch):
    cfg = load_config("tiny", [*TINY, "sweep.budgets=[4e8,8e8]"])
    ctx = RunContext("sweep-fault", "cli", None, track=False)
    rows = runner.plan_parts(sweep.STEP, cfg, ctx, latents=latents)
    monkeypatch.setenv(faults.ENV, f"sweep.point.{rows[1]['key']}")
    first = runner.run_part(sweep.STEP, cfg, ctx, rows[0], latents=latents)
    with pytest.raises(faults.InjectedFault):
        runner.run_part(sweep.STEP, cfg, ctx, rows[1], latents=latents)
    ckpt = Path(tessera_home) / "checkpoints" / ctx.run_id / "sweep" / rows[1]["key"]
    steps = rows[1]["steps"]
    assert (ckpt / f"step-{steps:07d}" / "COMPLETE").exists()  # it had trained to the end
    again = runner.run_part(sweep.STEP, cfg, ctx, rows[0], latents=latents)
    assert again == first  # committed: not retrained
    second = runner.run_part(sweep.STEP, cfg, ctx, rows[1], latents=latents)
    assert second["steps"] == steps and storage.is_committed(second["step_uri"])
    assert f"resumed from step {steps}" in (ckpt / "train_dit.log").read_text()
