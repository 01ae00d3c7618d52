"""Register a trained run's models in the MLflow registry: the ``register`` step
(``tessera register``; the DAG task after ``evaluate``).

- ``tessera-t2v`` (``register.model_name``): the generator as a pyfunc from code
  (:mod:`components.core.t2v_model`) with the DiT, VAE, text encoder, config and, when the run
  trained a captioner, the built-in prompt expander; signature with a params schema, an input
  example, pip requirements pinned to constraints.txt.
- ``tessera-vae`` and ``tessera-evaluator``: the run's model directories.
- **Lineage** on every version (tags) and the register run (``log_input`` of the versioned
  dataset, ``evaluation.json``): dataset revision and md5, the validation result, captioner
  version, the MLflow runs of train_vae, the sweep and its chosen point, train_evaluator and
  evaluate, every headline metric with its extractor's sha256, git sha, config hash. What the run
  lacks (a model trained outside the pipeline) is listed in ``tessera.lineage_missing``.
- **Idempotent and resumable**: a pipeline run registered before gets its existing versions
  back (``tessera.run_id`` tag); one whose registration was cut short (MLflow down half-way:
  the t2v version lacks ``tessera.registration_complete``) has its missing parts registered by
  the re-run, never a second version of a part. New versions get ``register.alias``
  (``challenger``).

Inputs: ``model`` (a directory with ``vae/`` + ``dit/``: the sweep's or train_dit's output),
``evaluation`` (the evaluate step's ``evaluation.json``; the gate of ``promote`` reads it),
``evaluator``, ``captioner`` and ``pairs`` (optional: the train_evaluator output, the
train_captioner's ``captioner`` and ``pairs``).
Everything else is read from the committed steps of the same pipeline run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from components.core import artifacts, registry, runner, storage, tracking
from components.core.config import TesseraConfig
from components.core.manifest import Lineage
from components.core.runner import StepResult, StepSpec

log = logging.getLogger(__name__)

LINEAGE_JSON = "lineage.json"
COMPLETE_TAG = "tessera.registration_complete"  # set last: a version without it was cut short
# upstream step -> what its committed outputs give the lineage
LINEAGE_STEPS = (
    "version",
    "validate",
    "caption",
    "train_vae",
    "sweep",
    "train_evaluator",
    "evaluate",
)


def collect_lineage(cfg: TesseraConfig, run_id: str) -> tuple[dict[str, str], list[str]]:
    """Lineage tags of pipeline run ``run_id`` from its committed steps, and what is missing."""
    import mlflow

    outputs = {
        step: runner.committed_outputs(runner.step_uri(cfg, run_id, step)) for step in LINEAGE_STEPS
    }
    tags: dict[str, str] = {
        registry.RUN_TAG: run_id,
        "tessera.git_sha": tracking.git_sha(),
        "tessera.config_hash": registry.config_hash(cfg),
        "tessera.profile": cfg.profile,
    }
    missing = [step for step, out in outputs.items() if out is None]
    if out := outputs["version"]:
        tags |= {
            "tessera.dataset_rev": str(out.get("dataset_rev", "")),
            "tessera.dataset_md5": str(out.get("dataset_md5", "")),
            "tessera.dataset_manifest": str(out.get("manifest", "")),
            "tessera.dataset_remote": str(out.get("remote", "")),
        }
    if out := outputs["validate"]:
        tags["tessera.validation"] = (
            f"success={out.get('success')}; {out.get('rows_passed')}/{out.get('rows_in')} rows "
            f"passed, {out.get('rows_quarantined')} quarantined; "
            f"{out.get('failed_expectations')} of {out.get('evaluated_expectations')} "
            "expectations failed"
        )
        tags["tessera.validate_run"] = str(out.get("mlflow_run_id") or "")
    if out := outputs["caption"]:
        tags["tessera.captioner_version"] = str(out.get("captioner_version", ""))
    for step in ("train_vae", "sweep", "train_evaluator", "evaluate"):
        if out := outputs[step]:
            tags[f"tessera.{step}_run"] = str(out.get("mlflow_run_id") or "")
    if (out := outputs["sweep"]) and out.get("best") and out.get("mlflow_run_id"):
        tags["tessera.dit_point"] = str(out["best"])
        experiment = mlflow.get_run(out["mlflow_run_id"]).info.experiment_id
        # the points' nested runs are tagged tessera.step = sweep_point (the sweep's POINT_STEP)
        point = tracking.find_run(experiment, run_id, "sweep_point", part=str(out["best"]))
        if point is not None:
            tags["tessera.dit_run"] = point.info.run_id
    return {k: v for k, v in tags.items() if v}, missing


def metric_tags(evaluation: dict[str, Any]) -> dict[str, str]:
    """``metric.<name>`` for every headline metric and ``extractor.<name>`` for their sha256."""
    metrics = evaluation.get("metrics") or {}
    tags = {
        f"metric.{k}": f"{float(v):.6g}"
        for k, v in metrics.items()
        if not k.endswith(("_low", "_high")) and "_n_" not in k and isinstance(v, (int, float))
    }
    tags |= {f"extractor.{k}": str(v) for k, v in (evaluation.get("extractors") or {}).items()}
    return tags


def run(
    cfg: TesseraConfig,
    workdir: Path,
    model: str,
    evaluation: str,
    evaluator: str = "",
    captioner: str = "",
    pairs: str = "",
) -> StepResult:
    """Register the run's models (see the module docstring)."""
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise registry.RegistryError(
            "register needs MLflow tracking (the registry lives there): run it without --no-track"
        )
    workdir = Path(workdir)
    run_id = (
        active.data.tags.get(registry.RUN_TAG)
        or mlflow.get_run(active.info.run_id).data.tags[registry.RUN_TAG]
    )
    rc = cfg.register
    if not storage.exists(evaluation):
        raise FileNotFoundError(
            f"evaluation {evaluation} does not exist: pass the evaluate step's 'result' "
            "(evaluation.json); promotion gates read it"
        )
    summary = json.loads(storage.read_text(evaluation))
    lineage, missing = collect_lineage(cfg, run_id)
    tags = {**lineage, **metric_tags(summary)}
    if missing:
        tags["tessera.lineage_missing"] = ",".join(missing)
        log.warning("register: run %s has no committed %s; lineage is partial", run_id, missing)
    (workdir / registry.EVALUATION_ARTIFACT).write_text(json.dumps(summary, indent=2) + "\n")
    (workdir / LINEAGE_JSON).write_text(json.dumps(tags, indent=2, sort_keys=True) + "\n")

    with registry.lock(rc.model_name):
        versions = _register(cfg, run_id, model, evaluator, captioner, pairs, tags, active)
    t2v = versions["t2v"]
    values = {
        "model_name": t2v.name,
        "model_version": t2v.version,
        "model_uri": t2v.uri,
        "created": t2v.created,
        "alias": rc.alias,
        **{f"{k}_version": v.version for k, v in versions.items() if k != "t2v"},
        "lineage_missing": missing,
    }
    print(
        f"register: {t2v.uri} ({'new' if t2v.created else 'registered before'}, alias {rc.alias}); "
        + ", ".join(f"{v.name} {v.version}" for k, v in versions.items() if k != "t2v")
    )
    return StepResult(
        files={"evaluation": registry.EVALUATION_ARTIFACT, "lineage": LINEAGE_JSON},
        values=values,
        artifacts=[registry.EVALUATION_ARTIFACT, LINEAGE_JSON],
    )


def _register(
    cfg: TesseraConfig,
    run_id: str,
    model: str,
    evaluator: str,
    captioner: str,
    pairs: str,
    tags: dict[str, str],
    active: Any,
) -> dict[str, registry.Registered]:
    """Register what run ``run_id`` has not registered yet, part by part; the t2v version is
    marked complete last, so a registration cut short (MLflow down half-way) is resumed by the
    re-run, and one completed before is returned as it is (its alias left where it is now)."""
    rc = cfg.register
    parts = [("vae", rc.vae_name)] + ([("evaluator", rc.evaluator_name)] if evaluator else [])
    t2v = registry.find_version(rc.model_name, run_id)
    if t2v is not None and t2v.tags.get(COMPLETE_TAG) == "true":
        log.info("register: run %s is %s version %s already", run_id, rc.model_name, t2v.version)
        found = {"t2v": registry.Registered(rc.model_name, t2v.version, False)}
        for key, name in parts:
            if (v := registry.find_version(name, run_id)) is not None:
                found[key] = registry.Registered(name, v.version, False)
        return found
    if t2v is not None:
        log.warning(
            "register: %s version %s of run %s was cut short; registering the rest",
            rc.model_name,
            t2v.version,
            run_id,
        )
    import mlflow

    mlflow_run = active.info.run_id
    dataset = {k: tags.get(f"tessera.dataset_{k}", "") for k in ("manifest", "rev", "md5")}
    if all(dataset.values()):
        tracking.log_lineage(Lineage(dataset["manifest"], dataset["rev"], dataset["md5"]))
    c = registry.client()
    found: dict[str, registry.Registered] = {}
    with (
        tempfile.TemporaryDirectory(prefix="tessera-register-") as tmp,
        artifacts.model_dir(model) as directory,
    ):
        if t2v is None:
            expander = None
            if captioner:
                expander = Path(tmp) / "expander"
                with artifacts.local_tree(captioner) as path:
                    _copy_expander(path, expander)
                if pairs:
                    (expander / "pairs.json").write_bytes(storage.read_bytes(pairs))
            info = registry.log_t2v_model(
                cfg, Path(directory), Path(tmp) / "staging", run_id, expander
            )
            t2v = registry.register_version(
                rc.model_name, info.model_uri, mlflow_run, tags, rc.alias, model_id=info.model_id
            )
        found["t2v"] = registry.Registered(rc.model_name, t2v.version, True)
        root = mlflow.get_run(mlflow_run).info.artifact_uri
        for key, name in parts:
            v = registry.find_version(name, run_id)
            if v is None:
                if key == "vae":
                    mlflow.log_artifacts(str(Path(directory) / "vae"), artifact_path="vae")
                else:
                    with artifacts.local_tree(_evaluator_dir(evaluator)) as path:
                        mlflow.log_artifacts(str(path), artifact_path="evaluator")
                part_tags = {**tags, "tessera.t2v_version": t2v.version}
                v = registry.register_version(
                    name, f"{root}/{key}", mlflow_run, part_tags, rc.alias
                )
            else:
                c.set_registered_model_alias(name, rc.alias, v.version)
            found[key] = registry.Registered(name, v.version, True)
            c.set_model_version_tag(rc.model_name, t2v.version, f"tessera.{key}_version", v.version)
    c.set_registered_model_alias(rc.model_name, rc.alias, t2v.version)
    c.set_model_version_tag(rc.model_name, t2v.version, COMPLETE_TAG, "true")
    return found


def _copy_expander(path: Path, out: Path) -> None:
    """The captioner directory (or a directory holding ``captioner/``) into ``out/captioner``."""
    import shutil

    source = path / artifacts.CAPTIONER_DIR if (path / artifacts.CAPTIONER_DIR).is_dir() else path
    if not (source / artifacts.MODEL_CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} holds no captioner ({artifacts.MODEL_CONFIG}): pass the train_captioner "
            "step's 'captioner' output"
        )
    shutil.copytree(source, out / artifacts.CAPTIONER_DIR)


def _evaluator_dir(uri: str) -> str:
    nested = storage.join(uri, artifacts.EVALUATOR_DIR)
    return nested if storage.exists(storage.join(nested, artifacts.MODEL_CONFIG)) else uri


STEP = StepSpec("register", run)
