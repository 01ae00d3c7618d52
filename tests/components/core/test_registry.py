"""The registry against a real MLflow server on loopback: register (idempotent, with lineage
pointing at real runs), promote through the gate (pass, fail, refused comparison), roll back
(same seed -> the same video), and two promotions at once -> one champion, one history."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from components.core import promotion, registry, runner, tracking
from components.core.config import load_config
from components.core.runner import RunContext, StepResult, StepSpec
from components.steps import promote as promote_step
from components.steps import register as register_step
from tests.testing_utils.models import save_servable_model

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("registry")]

PIPELINE = "tessera_pipeline"


def evaluation(fvd: float, sha: str = "a" * 64, n: float = 8.0, colour: list[bool] | None = None):
    colour = colour if colour is not None else [True, False, True, False]
    trials = [
        {"base": f"clips/{i // 2}.mp4", "asked": ["red", "blue"][i % 2], "correct": c}
        for i, c in enumerate(colour)
    ]
    return {
        "metrics": {
            "fvd_domain": fvd,
            "fvd_domain_n_real": n,
            "fvd_domain_n_fake": n,
            "clip_score_domain": 0.3,
            "clip_score_domain_n_samples": n,
            "colour_accuracy": sum(colour) / len(colour),
        },
        "extractors": {"domain": sha},
        "colour_following": {"trials": trials},
    }


def fake_upstream(cfg, ctx: RunContext, manifest: str) -> None:
    """Commit the upstream steps register reads (real MLflow runs, values as the steps write)."""
    values = {
        "version": {"dataset_rev": "0123abcd" * 5, "dataset_md5": "feed.dir", "manifest": manifest},
        "validate": {
            "success": True,
            "rows_in": 10,
            "rows_passed": 9,
            "rows_quarantined": 1,
            "evaluated_expectations": 12,
            "failed_expectations": 0,
        },
        "caption": {"captioner_version": "captioner-tiny-0123456789ab"},
        "train_vae": {},
        "sweep": {"best": "p0"},
        "train_evaluator": {},
        "evaluate": {},
    }
    for step, vals in values.items():

        def fn(cfg, workdir, vals=vals):
            return StepResult(values=dict(vals))

        runner.run_step(StepSpec(step, fn), cfg, ctx)
    sweep = runner.committed_outputs(runner.step_uri(cfg, ctx.run_id, "sweep"))["mlflow_run_id"]
    with tracking.step_run(
        cfg, "sweep_point", pipeline=ctx.pipeline, run_id=ctx.run_id, parent_run_id=sweep, part="p0"
    ):
        mlflow.set_tag("tessera.sweep.point_budget", "4e08")  # the chosen point's nested run


@pytest.fixture(scope="module")
def env(mlflow_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("registry-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TESSERA_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        mp.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        name = f"t2v-{uuid.uuid4().hex[:8]}"
        cfg = load_config(
            "tiny",
            [
                "generate.max_pixels=4096",
                f"register.model_name={name}",
                f"register.vae_name={name}-vae",
                f"register.evaluator_name={name}-evaluator",
                f"promote.model_name={name}",
            ],
        )
        yield {"home": home, "cfg": cfg, "name": name}


def save_captioner(path: Path) -> Path:
    """A random captioner-tiny as train_captioner saves it (what the expander bundles)."""
    import torch

    from model.captioner import CAPTIONER_SIZES, Captioner

    torch.manual_seed(0)
    Captioner(CAPTIONER_SIZES.config("captioner-tiny")).save_pretrained(path)
    return path


def register(env, model_seed: int, summary: dict, lineage: bool = False) -> dict:
    cfg, home = env["cfg"], env["home"]
    root = home / f"model-{model_seed}"
    if not root.exists():
        save_servable_model(root, seed=model_seed)
    ev = home / f"evaluation-{uuid.uuid4().hex[:6]}.json"
    ev.write_text(json.dumps(summary))
    parent = RunContext.new(PIPELINE)
    run_id = tracking.pipeline_run(cfg, PIPELINE, parent.run_id)
    ctx = RunContext(parent.run_id, PIPELINE, run_id)
    if lineage:
        manifest = home / "manifest.parquet"
        manifest.write_bytes(b"PAR1")
        fake_upstream(cfg, ctx, str(manifest))
    extra = {}
    if lineage:  # the pipeline's registration: with the run's captioner as prompt expander
        extra["captioner"] = str(save_captioner(home / "captioner"))
    out = runner.run_step(
        register_step.STEP, cfg, ctx, model=str(root), evaluation=str(ev), **extra
    )
    return {**out, "ctx": ctx, "root": root, "evaluation": str(ev)}


def cheap_version(env, summary: dict, name: str | None = None) -> dict:
    """A version whose only content is its evaluation (what the gate reads): a real registry
    entry for the gate tests that do not load the model, registered in a second, not a minute."""
    with mlflow.start_run(
        experiment_id=tracking.ensure_experiment("tessera/registry-tests")
    ) as run:
        mlflow.log_dict(summary, registry.EVALUATION_ARTIFACT)
        mlflow.log_dict({"note": "gate test"}, "model/note.json")
    version = registry.register_version(
        name or env["name"],
        f"{run.info.artifact_uri}/model",
        run.info.run_id,
        {registry.RUN_TAG: run.info.run_id},
        "challenger",
    )
    return {"model_version": version.version}


@pytest.fixture(scope="module")
def first(env):
    return register(env, 0, evaluation(100.0), lineage=True)


def test_a_registered_version_carries_lineage_to_real_runs_and_the_challenger_alias(env, first):
    c = registry.client()
    version = c.get_model_version(env["name"], first["model_version"])
    tags = version.tags
    assert tags["tessera.run_id"] == first["ctx"].run_id
    assert tags["tessera.dataset_rev"] == "0123abcd" * 5
    assert tags["tessera.captioner_version"] == "captioner-tiny-0123456789ab"
    assert "9/10 rows passed" in tags["tessera.validation"]
    for key in ("train_vae_run", "sweep_run", "dit_run", "train_evaluator_run", "evaluate_run"):
        run = c.get_run(tags[f"tessera.{key}"])  # a real run
        assert run.data.tags["tessera.run_id"] == first["ctx"].run_id
    assert c.get_run(tags["tessera.dit_run"]).data.tags["tessera.part"] == "p0"
    assert tags["metric.fvd_domain"] == "100" and tags["extractor.domain"] == "a" * 64
    assert len(tags["tessera.config_hash"]) == 16 and "tessera.lineage_missing" not in tags
    assert registry.version_by_alias(env["name"], "challenger").version == version.version
    # the register run logged the dataset as its input and the evaluation beside the model
    run = c.get_run(version.run_id)
    assert run.inputs.dataset_inputs[0].dataset.digest == "feed"
    assert registry.evaluation_of(env["name"], version)["metrics"]["fvd_domain"] == 100.0
    vae = c.get_model_version(f"{env['name']}-vae", first["vae_version"])
    assert vae.tags["tessera.t2v_version"] == version.version
    files = {
        Path(p).name
        for p in registry.download(f"models:/{env['name']}-vae/{vae.version}").iterdir()
    }
    assert {"config.json", "model.safetensors"} <= files


def test_registering_the_same_run_again_returns_its_version(env, first):
    cfg, ctx = env["cfg"], first["ctx"]
    # a retried task whose first try registered and then died before committing
    shutil.rmtree(runner.step_uri(cfg, ctx.run_id, "register"))
    again = runner.run_step(
        register_step.STEP, cfg, ctx, model=str(first["root"]), evaluation=first["evaluation"]
    )
    assert again["model_version"] == first["model_version"] and again["created"] is False
    found = registry.client().search_model_versions(f"name = '{env['name']}'")
    assert [v.version for v in found if v.tags.get("tessera.run_id") == ctx.run_id] == [
        str(first["model_version"])
    ]


@pytest.mark.fault("fault: MLflow down")
def test_mlflow_down_mid_registration_is_resumed_by_the_rerun_without_duplicates(env, monkeypatch):
    """MLflow goes down right after it created the t2v version (before its alias, the VAE's
    version and the completion tag): the step fails naming the server and commits nothing; the
    re-run registers the rest onto that version: one version per part, one MLflow run."""
    import dataclasses

    from components.core.tracking import TrackingError
    from tests.testing_utils.s3_proxy import FaultyS3Proxy

    home, name = env["home"], f"{env['name']}-down"  # its own models: the challenger of env's
    register_cfg = dataclasses.replace(
        env["cfg"].register, model_name=name, vae_name=f"{name}-vae", evaluator_name=f"{name}-ev"
    )
    cfg = dataclasses.replace(env["cfg"], register=register_cfg)
    root = home / "model-0"
    if not root.exists():
        save_servable_model(root, seed=0)
    ev = home / "evaluation-down.json"
    ev.write_text(json.dumps(evaluation(90.0)))
    upstream = os.environ["MLFLOW_TRACKING_URI"]  # the real server (the env fixture)
    parent = RunContext.new(PIPELINE)
    ctx = RunContext(parent.run_id, PIPELINE, tracking.pipeline_run(cfg, PIPELINE, parent.run_id))
    inputs = {"model": str(root), "evaluation": str(ev)}
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with FaultyS3Proxy(upstream, down_after="/model-versions/create").running() as down:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", down.url)
        with pytest.raises(
            TrackingError, match=f"MLflow at {down.url} failed during step register"
        ) as e:
            runner.run_step(register_step.STEP, cfg, ctx, **inputs)
        assert down.down and down.failed >= 1, str(e.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", upstream)
    assert runner.committed_outputs(runner.step_uri(cfg, ctx.run_id, "register")) is None
    c = registry.client()

    def versions(model: str) -> list:
        return c.search_model_versions(
            f"name = '{model}' and tags.`tessera.run_id` = '{ctx.run_id}'"
        )

    (cut,) = versions(name)
    assert register_step.COMPLETE_TAG not in cut.tags and versions(f"{name}-vae") == []
    again = runner.run_step(register_step.STEP, cfg, ctx, **inputs)
    (t2v,), (vae,) = versions(name), versions(f"{name}-vae")
    assert again["model_version"] == t2v.version == cut.version
    assert again["vae_version"] == vae.version and vae.tags["tessera.t2v_version"] == t2v.version
    assert t2v.tags[register_step.COMPLETE_TAG] == "true"
    assert t2v.tags["tessera.vae_version"] == vae.version
    assert c.get_model_version_by_alias(name, "challenger").version == t2v.version
    assert c.get_model_version_by_alias(f"{name}-vae", "challenger").version == vae.version
    experiments = [e.experiment_id for e in c.search_experiments()]
    query = f"tags.`tessera.run_id` = '{ctx.run_id}' and tags.`tessera.step` = 'register'"
    assert len(c.search_runs(experiments, query)) == 1
    # a retry after that (the task died before committing) finds the registration complete
    shutil.rmtree(runner.step_uri(cfg, ctx.run_id, "register"))
    third = runner.run_step(register_step.STEP, cfg, ctx, **inputs)
    assert (third["model_version"], third["vae_version"]) == (t2v.version, vae.version)
    assert third["created"] is False and len(versions(name)) == len(versions(f"{name}-vae")) == 1


def test_the_bundled_expander_expands_served_prompts(env, first):
    model = mlflow.pyfunc.load_model(f"models:/{env['name']}/{first['model_version']}")
    (out,) = model.predict(
        pd.DataFrame({"prompt": ["red ball bouncing"]}),
        params={"frames": 1, "aspect": "1:1", "steps": 1, "format": "png", "expand_prompt": True},
    )
    assert out["expanded_prompt"].startswith("red ball bouncing")  # the user's words are kept
    assert json.loads(out["expansion"])["backend"] == "builtin"
    (plain,) = model.predict(
        pd.DataFrame({"prompt": ["red ball bouncing"]}),
        params={"frames": 1, "aspect": "1:1", "steps": 1, "format": "png"},
    )
    assert plain["expanded_prompt"] is None


def promote(env, **kwargs) -> dict:
    return runner.run_step(promote_step.STEP, env["cfg"], RunContext.new("cli"), **kwargs)


def predict_frames(env, version: str) -> np.ndarray:
    import base64
    import io

    import av

    model = mlflow.pyfunc.load_model(f"models:/{env['name']}/{version}")
    out = model.predict(
        pd.DataFrame({"prompt": ["a red ball"]}),
        params={"frames": 5, "aspect": "1:1", "steps": 2, "seed": 11},
    )
    with av.open(io.BytesIO(base64.b64decode(out[0]["video"]))) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_promotion_gate_pass_fail_refusal_and_rollback(env, first):
    name = env["name"]
    first_out = promote(env)  # the first model: absolute thresholds only (none configured)
    assert first_out["decision"] == "promoted" and first_out["champion"] == str(
        first["model_version"]
    )
    before = predict_frames(env, first_out["champion"])

    worse = cheap_version(env, evaluation(150.0))  # FVD regressed: the default gate refuses
    refused = promote(env)
    assert refused["decision"] == "refused" and "fvd_domain" in refused["reason"]
    assert registry.version_by_alias(name, "champion").version == str(first["model_version"])
    tags = registry.client().get_model_version(name, worse["model_version"]).tags
    assert tags["tessera.promotion.decision"] == "refused" and tags["tessera.promotion.by"]

    other = cheap_version(env, evaluation(90.0, sha="b" * 64))  # better, but another extractor
    incomparable = promote(env)
    assert incomparable["decision"] == "refused" and "b" * 12 in incomparable["reason"]
    assert str(other["model_version"]) == incomparable["version"]

    better = register(env, 1, evaluation(80.0))
    promoted = promote(env)
    assert promoted["decision"] == "promoted" and promoted["champion"] == str(
        better["model_version"]
    )
    assert not np.array_equal(predict_frames(env, promoted["champion"]), before)

    back = promote(env, rollback=True)
    assert back["champion"] == str(first["model_version"])
    assert registry.version_by_alias(name, "champion").version == str(first["model_version"])
    np.testing.assert_array_equal(predict_frames(env, back["champion"]), before)
    with pytest.raises(registry.RegistryError, match="nothing to roll back"):
        promote(env, rollback=True)


def own_model(env) -> tuple[str, object]:
    """A registered model of the test's own (cheap versions only), so no other test's promotions
    can change what it sees, whatever the order or worker."""
    import dataclasses

    name = f"{env['name']}-{uuid.uuid4().hex[:6]}"
    return name, dataclasses.replace(env["cfg"].promote, model_name=name)


def test_manual_approval_waits_for_approve(env):
    import dataclasses

    name, pc = own_model(env)
    champion = cheap_version(env, evaluation(100.0), name)
    assert registry.promote(pc).decision == "promoted"
    manual = dataclasses.replace(pc, manual_approval=True)
    challenger = cheap_version(env, evaluation(10.0), name)
    waiting = registry.promote(manual, str(challenger["model_version"]))
    assert waiting.decision == "pending_approval"
    assert registry.version_by_alias(name, "champion").version == str(champion["model_version"])
    approved = registry.promote(manual, str(challenger["model_version"]), approve=True)
    assert approved.decision == "promoted" and approved.champion == str(challenger["model_version"])


def test_two_concurrent_promotions_end_with_one_champion_and_a_consistent_history(env):
    name, pc = own_model(env)
    a = cheap_version(env, evaluation(5.0), name)
    b = cheap_version(env, evaluation(5.0), name)
    results, errors = [], []

    def go(version):
        try:
            results.append(registry.promote(pc, str(version)))
        except Exception as e:  # noqa: BLE001 - the test reports any failure below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(v["model_version"],)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r.decision for r in results) == ["promoted", "promoted"]
    champion = registry.version_by_alias(name, "champion").version
    history = json.loads(registry.client().get_registered_model(name).tags[registry.HISTORY_TAG])
    assert history[-1] == champion
    # the second promotion compared against (and replaced) the first one's champion
    second = max(results, key=lambda r: history.index(r.version))
    first_done = min(results, key=lambda r: history.index(r.version))
    assert second.previous == first_done.version


def test_a_cross_extractor_comparison_is_refused_by_the_gate_itself():
    ours = promotion.evidence(evaluation(1.0, sha="c" * 64))
    theirs = promotion.evidence(evaluation(2.0, sha="d" * 64))
    with pytest.raises(promotion.IncomparableError, match="fvd_domain"):
        promotion.decide(ours, theirs, load_config("tiny").promote.gates)
