"""Kubernetes mode without a cluster: with ``[tessera] task_mode = kubernetes`` the training
tasks parse as KubernetesPodOperators (image, GPU requests = limits, node selector,
tolerations, the pod template, retries, ``tessera task <step>``), their pod specs render, and in
local mode they stay Python tasks. ``tessera task`` itself runs as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from components.orchestration import kubernetes, tasks

REPO = Path(__file__).resolve().parents[3]
PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags[sys.argv[2]]
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "tasks": {}}
class TI:  # the XComs the arguments' templates pull
    def xcom_pull(self, task_ids=None, **kw):
        return {"start": {"run_id": "r1", "track": False},
                "version": {"manifest": "s3://b/m.parquet"},
                "dataset": {"manifest": "s3://b/m.parquet", "factors": "s3://b/f.parquet"}
                }.get(task_ids)
for t in dag.tasks:
    info = {"kind": type(t).__name__, "retries": t.retries, "pool": t.pool}
    if info["kind"] == "KubernetesPodOperator":
        info |= {"image": t.image, "cmds": t.cmds, "pod_template_file": t.pod_template_file,
                 "do_xcom_push": t.do_xcom_push, "namespace": t.namespace}
        t.render_template_fields({"params": dag.params, "ti": TI()},
                                 jinja_env=dag.get_template_env())
        pod = t.build_pod_request_obj(None, dry_run=True)
        base = next(c for c in pod.spec.containers if c.name == "base")
        info["pod"] = {
            "requests": base.resources.requests, "limits": base.resources.limits,
            "tolerations": [x.to_dict() for x in pod.spec.tolerations],
            "node_selector": pod.spec.node_selector, "command": base.command, "args": base.args,
            "volumes": sorted(v.name for v in pod.spec.volumes),
            "env_from": [e.secret_ref.name for e in base.env_from],
            "env": {e.name: e.value for e in base.env or []},
            "containers": sorted(c.name for c in pod.spec.containers)}
    elif info["kind"] == "MappedOperator":
        info["operator"] = getattr(t.operator_class, "__name__", str(t.operator_class))
        info["expand"] = sorted(t.expand_input.value)
        info["image"] = t.partial_kwargs.get("image")
        info["cmds"] = t.partial_kwargs.get("cmds")
        resources = t.partial_kwargs.get("container_resources")
        info["limits"] = resources.limits if resources is not None else None
    out["tasks"][t.task_id] = info
print(json.dumps(out, default=str))
"""
TRAINING = ["train_captioner", "train_vae", "train_evaluator"]


def _parse(tmp_path: Path, dag_id: str, mode: str, **extra: str) -> dict:
    env = {
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__TESSERA__TASK_MODE": mode,
        "AIRFLOW_CONN_KUBERNETES_DEFAULT": '{"conn_type": "kubernetes"}',
        "TESSERA_HOME": str(tmp_path / "tessera"),
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "dags" / f"{dag_id}.py"), dag_id],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    return found["tasks"]


@pytest.fixture(scope="module")
def pods(tmp_path_factory):
    return _parse(tmp_path_factory.mktemp("k8s"), "tessera_pipeline", "kubernetes")


def test_training_tasks_are_gpu_pods_of_the_tessera_image(pods):
    gpu = {"nvidia.com/gpu": "1", "cpu": "4", "memory": "32Gi"}
    for task in TRAINING:
        op = pods[task]
        assert op["kind"] == "KubernetesPodOperator", task
        assert op["image"] == "tessera:0.1.0" and op["namespace"] == "tessera"
        assert op["retries"] == 2 and op["do_xcom_push"] is True
        assert Path(op["pod_template_file"]).is_file()
        assert op["cmds"] == ["tessera"]
        pod = op["pod"]
        assert pod["requests"] == pod["limits"] == gpu
        assert pod["node_selector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert pod["tolerations"][0]["effect"] == "NoSchedule"
        assert pod["command"] == ["tessera"] and pod["args"][:2] == ["task", task]
        assert pod["args"][-2:] == ["--output", kubernetes.XCOM_RETURN]
        # from the template: the store volume, credentials only from Secrets, XCom sidecar
        assert {"tessera-home", "xcom"} <= set(pod["volumes"])
        assert pod["env_from"] == ["tessera-s3", "tessera-mlflow"]
        assert not any("SECRET" in k or "PASSWORD" in k for k in pod["env"])
        assert pod["containers"] == ["airflow-xcom-sidecar", "base"]
    assert pods["train_captioner"]["pool"] == "accelerator"


def test_pod_arguments_render_the_tasks_inputs(pods):
    args = pods["train_captioner"]["pod"]["args"]
    opts = dict(zip(args[2::2], args[3::2], strict=True))
    assert json.loads(opts["--run"]) == {"run_id": "r1", "track": False}
    assert json.loads(opts["--inputs"]) == {"manifest": "s3://b/m.parquet", "factors": ""}
    assert json.loads(opts["--params"])["profile"] == "demo"


def test_the_sweep_points_stay_mapped_pods(pods):
    point = pods["sweep_point"]
    assert point["kind"] == "MappedOperator" and point["operator"] == "KubernetesPodOperator"
    assert point["expand"] == ["arguments"] and point["pool"] == "accelerator"
    assert point["retries"] == 2 and point["image"] == "tessera:0.1.0"
    assert point["limits"]["nvidia.com/gpu"] == "1"
    assert pods["sweep_point_args"]["kind"] == "_PythonDecoratedOperator"


def test_sweep_point_arguments_carry_each_point_and_the_shared_inputs():
    points = [{"key": "a"}, {"key": "b"}]
    args = kubernetes.sweep_point_arguments({"run_id": "r"}, "s3://l", "s3://v", points, {"x": 1})
    assert len(args) == 2 and all(a[:3] == ["task", "sweep", "--part"] for a in args)
    assert [json.loads(a[3]) for a in args] == points
    opts = dict(zip(args[1][4::2], args[1][5::2], strict=True))
    assert json.loads(opts["--inputs"]) == {"latents": "s3://l", "vae": "s3://v"}
    assert json.loads(opts["--params"]) == {"x": 1} and json.loads(opts["--run"]) == {"run_id": "r"}


def test_the_recaption_ablations_points_are_the_same_pods(tmp_path):
    found = _parse(tmp_path, "recaption_ablation", "kubernetes")
    point = found["sweep_point"]
    assert point["kind"] == "MappedOperator" and point["operator"] == "KubernetesPodOperator"
    assert point["expand"] == ["arguments"] and point["pool"] == "accelerator"
    assert point["image"] == "tessera:0.1.0" and point["limits"]["nvidia.com/gpu"] == "1"
    assert point["cmds"] == ["tessera"]
    assert found["sweep_point_args"]["kind"] == "_PythonDecoratedOperator"
    local = _parse(tmp_path / "local", "recaption_ablation", "local")
    assert local["sweep_point"]["kind"] == "DecoratedMappedOperator"
    assert "sweep_point_args" not in local


def test_pod_settings_come_from_the_tessera_section(tmp_path):
    found = _parse(
        tmp_path,
        "tessera_train",
        "kubernetes",
        AIRFLOW__TESSERA__IMAGE="registry.example/tessera:0.2.0",
        AIRFLOW__TESSERA__GPUS="8",
        AIRFLOW__TESSERA__NODE_SELECTOR='{"pool": "h100"}',
    )
    pod = found["train_vae"]["pod"]
    assert found["train_vae"]["image"] == "registry.example/tessera:0.2.0"
    assert pod["limits"]["nvidia.com/gpu"] == "8" and pod["node_selector"] == {"pool": "h100"}
    args = found["train_captioner"]["pod"]["args"]
    inputs = json.loads(args[args.index("--inputs") + 1])
    assert inputs == {"manifest": "s3://b/m.parquet", "factors": "s3://b/f.parquet"}


def test_local_mode_keeps_python_tasks(tmp_path):
    found = _parse(tmp_path, "tessera_pipeline", "local")
    for task in [*TRAINING, "sweep_point"]:
        assert found[task]["kind"] in ("_PythonDecoratedOperator", "DecoratedMappedOperator"), task
    assert "sweep_point_args" not in found


def test_a_wrong_task_mode_is_refused(monkeypatch):
    monkeypatch.setenv("AIRFLOW__TESSERA__TASK_MODE", "slurm")
    with pytest.raises(ValueError, match="task_mode"):
        kubernetes.task_mode()


def test_the_arguments_are_the_tessera_task_interface():
    args = kubernetes.task_arguments("sweep", params="{}", run="{}", inputs="{}", part='{"i": 0}')
    assert args == ["task", "sweep", "--part", '{"i": 0}', "--params", "{}", "--run", "{}"] + [
        "--inputs",
        "{}",
        "--output",
        "/airflow/xcom/return.json",
    ]


# --------------------------------------------------------------------------- tessera task


def _tessera_task(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"TESSERA_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(Path(sys.executable).with_name("tessera")), "task", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )


def test_tessera_task_start_writes_the_run_handle(tmp_path):
    out = tmp_path / "xcom" / "return.json"
    params = json.dumps({"profile": "tiny", "track": False})
    run = json.dumps({"run_id": "manual__2026-01-01T00:00:00+00:00", "pipeline": "tessera_train"})
    proc = _tessera_task(tmp_path, "start", "--params", params, "--run", run, "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text()) == {
        "run_id": "manual__2026-01-01T00-00-00-00-00",
        "parent_run_id": None,
        "track": False,
        "pipeline": "tessera_train",
    }


def test_tessera_task_refuses_bad_json(tmp_path):
    proc = _tessera_task(tmp_path, "train_vae", "--inputs", "[1]", "--output", "x.json")
    assert proc.returncode != 0 and "--inputs must be a JSON dict" in proc.stderr
    assert not (tmp_path / "x.json").exists()


# --------------------------------------------------------------------------- params, dataset


def test_typed_params_become_config_overrides():
    params = {"profile": "tiny", "overrides": ["sweep.budgets=[1e12]", "seed=3"]}
    params |= {"budgets": [2e12, 4e12], "manual_approval": True, "gates": None}
    assert tasks.param_overrides(params) == [
        "sweep.budgets=[1e12]",
        "seed=3",
        "sweep.budgets=[2000000000000.0, 4000000000000.0]",
        "promote.manual_approval=true",
    ]
    cfg = tasks.config({**params, "gates": [{"metric": "fvd_domain", "max_regression": 0.5}]})
    assert cfg.sweep.budgets == (2e12, 4e12) and cfg.promote.manual_approval is True
    assert [(g.metric, g.max_regression) for g in cfg.promote.gates] == [("fvd_domain", 0.5)]
    default = tasks.config({"profile": "tiny", "budgets": [], "manual_approval": None})
    assert default == tasks.config({"profile": "tiny"})  # empty / null: the profile's value


def test_a_training_run_reads_an_earlier_runs_dataset(tessera_home):
    from components.core import runner
    from components.core.config import load_config
    from components.core.runner import RunContext, StepResult, StepSpec

    params = {"profile": "tiny", "track": False}
    with pytest.raises(FileNotFoundError, match="run the tessera_pipeline DAG first"):
        tasks.dataset(params)
    with pytest.raises(FileNotFoundError, match="no committed version step"):
        tasks.dataset(params, "d1")
    cfg, ctx = load_config("tiny"), RunContext("d1", track=False)
    values = {"manifest": "s3://b/m.parquet", "dataset_rev": "abc"}
    runner.run_step(StepSpec("version", lambda cfg, workdir: StepResult(values=values)), cfg, ctx)
    found = tasks.dataset(params, "d1")
    assert found["manifest"] == "s3://b/m.parquet" and found["data_run"] == "d1"
    assert tasks.corpus(params, {"run_id": "t1", "track": False}, found) == {}
