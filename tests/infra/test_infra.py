"""The team box (infra/compose.yaml), its image (infra/docker/Dockerfile), the Helm values
(infra/kubernetes/values-airflow.yaml) and the DeepSpeed configs (infra/deepspeed/*.json), checked
statically: no Docker daemon, cluster or network. ``docker-compose config`` validates the compose
file offline; everything else is read with ``yaml`` / ``json`` and the project's own code.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose.yaml"
COMPOSE_GPU = INFRA / "compose.gpu.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
VALUES = INFRA / "kubernetes" / "values-airflow.yaml"
POD_TEMPLATE = INFRA / "kubernetes" / "pod-template.yaml"
AIRFLOW_INIT = INFRA / "airflow-init.sh"
README = INFRA / "README.md"
DOCKER_COMPOSE = Path("/usr/bin/docker-compose")

# ${VAR}, ${VAR:-default}, ${VAR:?message}; `$${...}` is compose's escape for the container's shell
VAR_REF = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
TESSERA_ENV_KEYS = ("TESSERA_HOME", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|FERNET|JWT|SQL_ALCHEMY_CONN|MLFLOW_BACKEND")


# ---- helpers ---------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def resolve_defaults(value: str) -> str:
    """``value`` with every ``${VAR:-default}`` replaced by its default (as with VAR unset)."""
    return VAR_REF.sub(lambda m: m.group(3) if m.group(2) in (":-", "-") else m.group(0), value)


def resolve(value: str) -> str:
    """``value`` with defaults filled in and required variables set to ``secret``."""
    return interpolate(resolve_defaults(value))


def interpolate(value: str) -> str:
    """``value`` as compose would give it with only the required variables set (to ``secret``)."""
    return VAR_REF.sub(lambda m: "secret" if m.group(2) in (":?", "?") else m.group(0), value)


def required_vars() -> list[str]:
    """The variables compose refuses to start without (``${VAR:?message}``)."""
    return sorted({m[0] for m in VAR_REF.findall(COMPOSE.read_text()) if m[1] in (":?", "?")})


def dockerfile_instructions() -> list[tuple[str, list[str]]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines, out = [], []
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        lines.append(raw.rstrip())
        if not raw.rstrip().endswith("\\"):
            joined = " ".join(part.rstrip("\\").strip() for part in lines)
            lines = []
            word, _, rest = joined.partition(" ")
            out.append((word.upper(), shlex.split(rest)))
    return out


def copied_sources() -> list[str]:
    """Build-context paths the Dockerfile COPYs (sources of every COPY without --from)."""
    sources = []
    for word, args in dockerfile_instructions():
        if word != "COPY" or any(a.startswith("--from") for a in args):
            continue
        paths = [a for a in args if not a.startswith("--")]
        sources += [p.rstrip("/") for p in paths[:-1]]
    return sources


def is_copied(path: str) -> bool:
    return any(path == src or path.startswith(f"{src}/") for src in copied_sources())


def workdir() -> str:
    return [args[0] for word, args in dockerfile_instructions() if word == "WORKDIR"][-1]


def tessera_services() -> dict[str, dict]:
    """The services that run the tessera image (built from infra/docker/Dockerfile)."""
    return {name: svc for name, svc in services().items() if "build" in svc}


def one_shot_services() -> set[str]:
    """Services others wait for with ``service_completed_successfully``: they run and exit."""
    return {
        dep
        for svc in services().values()
        for dep, spec in (svc.get("depends_on") or {}).items()
        if isinstance(spec, dict) and spec.get("condition") == "service_completed_successfully"
    }


def command_words(svc: dict) -> list[str]:
    command = svc.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def helm_values() -> dict:
    return yaml.safe_load(VALUES.read_text())


def helm_env() -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in helm_values().get("env", [])}


def in_image(path: str) -> str:
    """The repository path of a path inside the tessera image (under its WORKDIR)."""
    root = workdir().rstrip("/") + "/"
    assert path.startswith(root), f"{path} is not under the image's WORKDIR {root}"
    return path[len(root) :]


# ---- compose: validated by docker-compose itself, offline ------------------------------------


def run_compose_config(
    env: dict[str, str], tmp: Path, *overrides: Path
) -> subprocess.CompletedProcess:
    """`docker-compose config -q` with exactly ``env`` (an empty env file: no infra/.env)."""
    if not DOCKER_COMPOSE.is_file():
        pytest.fail(
            f"{DOCKER_COMPOSE} is missing: `make system` installs it (Debian's docker-compose; "
            "it validates infra/compose.yaml offline, without a Docker daemon)"
        )
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env_file = tmp / "empty.env"
    env_file.write_text("")
    return subprocess.run(
        [
            str(DOCKER_COMPOSE),
            "--env-file",
            str(env_file),
            *[arg for path in (COMPOSE, *overrides) for arg in ("-f", str(path))],
            "config",
            "-q",
        ],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=INFRA,
    )


def dummy_secrets() -> dict[str, str]:
    return {name: f"dummy-{name.lower()}" for name in required_vars()}


def test_compose_has_required_secrets():
    assert {"POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "MINIO_ROOT_PASSWORD"} <= set(
        required_vars()
    )


def test_compose_config_validates_offline(tmp_path):
    proc = run_compose_config(dummy_secrets(), tmp_path)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stdout}\n{proc.stderr}"


def test_compose_gpu_override_validates_offline(tmp_path):
    override = yaml.safe_load(COMPOSE_GPU.read_text())
    assert set(override["services"]) <= set(services())
    proc = run_compose_config(dummy_secrets(), tmp_path, COMPOSE_GPU)
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("missing", required_vars())
def test_compose_config_refuses_a_missing_secret(missing, tmp_path):
    env = dummy_secrets()
    del env[missing]
    proc = run_compose_config(env, tmp_path)
    assert proc.returncode != 0, f"compose started without {missing}"
    assert missing in proc.stderr + proc.stdout


# ---- compose: read with yaml -----------------------------------------------------------------


def test_every_image_has_a_pinned_tag():
    for name, svc in services().items():
        assert "image" in svc, f"service {name} has no image (an untagged build)"
        image = resolve_defaults(svc["image"])
        last = image.rsplit("/", 1)[-1]
        assert ":" in last or "@sha256:" in image, f"service {name}: {image} has no tag"
        tag = last.rsplit(":", 1)[-1]
        assert tag and tag != "latest", f"service {name}: {image} is not pinned"
    for word, args in dockerfile_instructions():
        if word == "FROM":
            image = args[0]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


def test_every_long_running_service_has_a_healthcheck():
    one_shots = one_shot_services()
    assert {"minio-init", "airflow-init"} <= one_shots
    for name, svc in services().items():
        if name in one_shots:
            assert svc.get("restart", "no") == "no", f"one-shot {name} must not restart"
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test"), f"long-running service {name} has no healthcheck"
        assert not check.get("disable"), name


def test_every_depends_on_uses_a_condition():
    all_services = services()
    one_shots = one_shot_services()
    for name, svc in all_services.items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on must map services to conditions"
        for dep, spec in depends.items():
            assert dep in all_services, f"{name} depends on unknown service {dep}"
            condition = (spec or {}).get("condition")
            if condition == "service_healthy":
                assert all_services[dep].get("healthcheck"), f"{name} waits on {dep}'s health"
            else:
                assert condition == "service_completed_successfully", f"{name} -> {dep}"
                assert dep in one_shots


def test_every_build_uses_the_tessera_dockerfile():
    builds = tessera_services()
    assert {"mlflow", "airflow-init"} <= set(builds)
    images = set()
    for name, svc in builds.items():
        build = svc["build"]
        context = (INFRA / build["context"]).resolve()
        assert context == REPO, f"{name}: the build context must be the repository root"
        assert build["dockerfile"] == "infra/docker/Dockerfile", name
        assert (context / build["dockerfile"]).is_file()
        images.add(resolve_defaults(svc["image"]))
    assert len(images) == 1, f"one tessera image for every Tessera service, got {images}"


def test_airflow_runs_as_separate_services_from_the_tessera_image():
    svcs = tessera_services()
    for component in AIRFLOW_COMPONENTS:
        name = f"airflow-{component}"
        assert name in svcs, f"no compose service {name}"
        assert command_words(svcs[name])[:2] == ["airflow", component]
        env = svcs[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        conn = urlparse(resolve(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]))
        assert (conn.scheme, conn.hostname, conn.path) == (
            "postgresql+psycopg2",
            "postgres",
            "/airflow",
        )
        assert "simple_auth_manager" in env["AIRFLOW__CORE__AUTH_MANAGER"]
        assert env["AIRFLOW__TESSERA__TASK_MODE"] == "local"
        assert svcs[name]["depends_on"]["airflow-init"]["condition"] == (
            "service_completed_successfully"
        )
    assert "airflow-init.sh" in " ".join(command_words(svcs["airflow-init"]))
    # tasks reach the execution API of the api-server service, on the port it listens on
    api = urlparse(
        svcs["airflow-scheduler"]["environment"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
    )
    assert api.hostname == "airflow-api-server" and api.path == "/execution/"
    assert str(api.port) in command_words(svcs["airflow-api-server"])


def test_scripts_compose_runs_exist_and_are_in_the_image():
    root = workdir().rstrip("/") + "/"
    ignored = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()]
    ignored = [p for p in ignored if p and not p.startswith("#")]
    found = []
    for name, svc in tessera_services().items():
        for word in command_words(svc):
            if not word.startswith(root):
                continue
            path = in_image(word)
            found.append(path)
            assert (REPO / path).is_file(), f"{name} runs {word}: {path} is not in the repo"
            assert os.access(REPO / path, os.X_OK), f"{path} is not executable"
            assert is_copied(path), f"{name} runs {word}, but the Dockerfile does not COPY {path}"
            assert not any(fnmatch.fnmatch(path, pat) for pat in ignored), f"{path} is ignored"
    assert {"infra/mlflow-server.sh", "infra/airflow-init.sh"} <= set(found)


def test_the_image_holds_what_the_code_reads_from_the_source_tree():
    from components.core.config import PROFILES_DIR, TrainConfig

    assert workdir() == "/opt/tessera"
    for path in (TrainConfig.deepspeed_dir(), Path(PROFILES_DIR), REPO / "dags"):
        assert is_copied(str(path.relative_to(REPO))), f"the image lacks {path}"
    assert is_copied(str(POD_TEMPLATE.relative_to(REPO)))


def test_bind_mounts_exist():
    for name, svc in services().items():
        for volume in svc.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (INFRA / source).exists(), f"{name} mounts missing {source}"


def test_postgres_creates_the_mlflow_database():
    pg = services()["postgres"]
    mounts = [v for v in pg["volumes"] if ":/docker-entrypoint-initdb.d/" in v]
    assert mounts, "no init script mounted into /docker-entrypoint-initdb.d"
    script = (INFRA / mounts[0].split(":", 1)[0]).read_text()
    assert "CREATE DATABASE mlflow" in script and "CREATE USER mlflow" in script
    backend = urlparse(resolve(services()["mlflow"]["environment"]["MLFLOW_BACKEND"]))
    assert backend.scheme == "postgresql+psycopg2"
    assert (backend.username, backend.path, backend.hostname) == ("mlflow", "/mlflow", "postgres")


def test_minio_init_creates_the_artifact_bucket():
    init = services()["minio-init"]
    script = " ".join(command_words(init) + [str(e) for e in init.get("entrypoint", [])])
    assert "mc mb --ignore-existing" in script
    bucket = resolve_defaults(init["environment"]["TESSERA_BUCKET"])
    artifacts = urlparse(resolve_defaults(services()["mlflow"]["environment"]["MLFLOW_ARTIFACTS"]))
    assert (artifacts.scheme, artifacts.netloc) == ("s3", bucket)


def test_mlflow_accepts_the_hosts_that_call_it():
    from mlflow.server.security_utils import is_allowed_host_header

    script = (INFRA / "mlflow-server.sh").read_text()
    assert script.index("mlflow db upgrade") < script.index("exec mlflow server")
    assert "--allowed-hosts" in script
    env = services()["mlflow"]["environment"]
    allowed = env["MLFLOW_ALLOWED_HOSTS"].split(",")
    tracking = urlparse(env["MLFLOW_TRACKING_URI"])
    for host in (tracking.netloc, "localhost:5000", "127.0.0.1:5000"):
        assert is_allowed_host_header(allowed, host), f"MLflow would refuse Host: {host}"


def test_tessera_env_is_the_same_everywhere():
    expected = compose()["x-tessera-env"]
    assert set(TESSERA_ENV_KEYS) <= set(expected)
    assert expected["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert expected["AWS_ENDPOINT_URL"] == "http://minio:9000"
    for name, svc in tessera_services().items():
        env = svc["environment"]
        for key in TESSERA_ENV_KEYS:
            assert env.get(key) == expected[key], f"{name}: {key}"


def test_no_literal_secrets():
    for name, svc in services().items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        for key, value in env.items():
            if SECRET_KEY.search(key) and not key.endswith("_FILE"):
                refs = VAR_REF.findall(str(value))
                assert refs and all(op in (":?", "?") for _, op, _ in refs), (
                    f"{name}: {key} must come from the environment as ${{VAR:?message}}"
                )


def test_every_variable_compose_reads_is_documented():
    readme = README.read_text()
    names = sorted({m[0] for m in VAR_REF.findall(COMPOSE.read_text())})
    assert names
    missing = [name for name in names if f"`{name}`" not in readme]
    assert not missing, f"infra/README.md does not document {missing}"


# ---- pools: one list, compose and Kubernetes ------------------------------------------------


def test_airflow_init_creates_every_pool():
    from components.orchestration.airflow_local import POOLS

    created = dict(re.findall(r"airflow pools set (\w+) (\S+)", AIRFLOW_INIT.read_text()))
    assert set(created) == set(POOLS)
    for name, (slots, _) in POOLS.items():
        if name == "accelerator":  # per site: the training jobs its accelerators hold at once
            assert created[name] == '"${TESSERA_ACCELERATOR_SLOTS:-1}"'
        else:
            assert created[name] == str(slots), name
    assert "airflow db migrate" in AIRFLOW_INIT.read_text()


# ---- Helm values -----------------------------------------------------------------------------


def test_helm_values_use_the_tessera_image():
    values = helm_values()
    compose_image = resolve_defaults(services()["mlflow"]["image"])
    name, version = compose_image.rsplit(":", 1)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert version == project["version"]
    image = values["images"]["airflow"]
    assert image["repository"].rsplit("/", 1)[-1] == name
    assert str(image["tag"]).split("-")[0] == version
    assert values["airflowVersion"] == "3.3.2"
    assert values["executor"] in ("LocalExecutor", "KubernetesExecutor")


def test_helm_values_point_at_the_pod_template_and_task_mode():
    env = helm_env()
    assert env["AIRFLOW__TESSERA__TASK_MODE"] == "kubernetes"
    template = in_image(env["AIRFLOW__TESSERA__POD_TEMPLATE_FILE"])
    assert template == str(POD_TEMPLATE.relative_to(REPO))
    assert is_copied(template)


def test_tessera_settings_are_ones_the_dags_read(monkeypatch):
    from components.orchestration import kubernetes

    prefix = "AIRFLOW__TESSERA__"
    helm = {k: v for k, v in helm_env().items() if k.startswith(prefix)}
    composed = {
        k: v
        for svc in tessera_services().values()
        for k, v in (svc.get("environment") or {}).items()
        if k.startswith(prefix)
    }
    for key in {*helm, *composed}:
        assert key[len(prefix) :].lower() in kubernetes.DEFAULTS, f"the DAGs do not read {key}"
    for key, value in helm.items():
        monkeypatch.setenv(key, value)
    assert kubernetes.task_mode() == "kubernetes"
    pods = kubernetes.PodSettings.read()  # the GPU pool, parsed as the DAG parses it
    image = helm_values()["images"]["airflow"]
    assert pods.image == f"{image['repository']}:{image['tag']}"
    assert pods.gpu_resource == "nvidia.com/gpu" and pods.gpus >= 1
    assert pods.node_selector and pods.tolerations
    assert any(t.get("key") == pods.gpu_resource for t in pods.tolerations)
    # the compose box's image is the one kubernetes mode names by default
    assert resolve_defaults(services()["mlflow"]["image"]) == kubernetes.DEFAULTS["image"]


def test_pod_template_exists():
    assert POD_TEMPLATE.is_file(), f"{POD_TEMPLATE} (referenced by the Helm values) is missing"


def test_helm_values_create_the_pools():
    values = helm_values()
    args = " ".join(values["migrateDatabaseJob"]["args"])
    assert in_image(re.search(r"/\S+airflow-init\.sh", args).group(0)) == "infra/airflow-init.sh"
    assert int(helm_env()["TESSERA_ACCELERATOR_SLOTS"]) >= 1


def test_helm_values_reach_mlflow_s3_and_an_external_postgres():
    values = helm_values()
    env = helm_env()
    for key in TESSERA_ENV_KEYS:
        assert env.get(key), f"no {key} in the Helm values' env"
    assert values["postgresql"]["enabled"] is False
    assert values["data"]["metadataSecretName"]
    secrets = {s["envName"]: s for s in values["secret"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secrets)
    assert all(s["secretName"] and s["secretKey"] for s in secrets.values())
    assert not any(SECRET_KEY.search(key) for key in env), "secrets belong in `secret:`"


# ---- DeepSpeed configs: resolved as the Trainer does, then loaded by DeepSpeed ----------------


DEEPSPEED_FILES = sorted((INFRA / "deepspeed").glob("*.json"))


def test_deepspeed_files_exist():
    assert {p.stem for p in DEEPSPEED_FILES} >= {"zero0", "zero1", "zero2", "zero3"}


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("path", DEEPSPEED_FILES, ids=lambda p: p.stem)
def test_deepspeed_config_loads_in_deepspeed(path, world_size, monkeypatch):
    import deepspeed.runtime.config as ds_config

    from components.core import trainer
    from components.core.config import TrainConfig

    pinned_bf16 = json.loads(path.read_text()).get("bf16", {}).get("enabled") is True
    train = TrainConfig(
        deepspeed=path.stem,
        precision="bf16" if pinned_bf16 else "fp32",
        micro_batch=2,
        grad_accum=3,
        grad_clip=0.5,
    )
    if pinned_bf16:
        # the GPU files: refused on this CPU machine, as documented; resolved as on CUDA
        with pytest.raises(ValueError, match="pins bf16.enabled"):
            trainer.deepspeed_config(train, world_size)
        monkeypatch.setattr(trainer, "bf16_weights", lambda train: True)
    resolved = trainer.deepspeed_config(train, world_size)
    assert "auto" not in json.dumps(resolved)

    # DeepSpeedConfig asks deepspeed.comm for the world (1 when not initialised)
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: world_size)
    config = ds_config.DeepSpeedConfig(resolved, mpu=None)
    assert config.world_size == world_size
    assert config.train_micro_batch_size_per_gpu == 2
    assert config.gradient_accumulation_steps == 3
    assert config.train_batch_size == 2 * 3 * world_size
    assert config.gradient_clipping == 0.5
    assert config.bfloat16_config.enabled is pinned_bf16
    assert config.zero_optimization_stage == resolved["zero_optimization"]["stage"]
    assert config.zero_allow_untested_optimizer
    offload = resolved["zero_optimization"].get("offload_optimizer")
    if offload:
        assert config.zero_config.offload_optimizer.device == offload["device"]
