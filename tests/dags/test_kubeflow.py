"""The Kubeflow twin (dags/kubeflow/pipeline.py) compiles, in its own environment (`make kfp`),
to a KFP v2 pipeline with the Airflow DAG's task ids and edges, typed parameters, GPU requests on
the training tasks and a retry policy on every task.

How the two graphs are compared: KFP task names are the Airflow task ids with ``-`` for ``_``.
KFP's wrapper nodes (``for-loop-N`` of a ``dsl.ParallelFor``, ``condition-N`` of a ``dsl.If``,
``exit-handler-N``) are structural and removed: an edge is read from where a task's input comes
from (traced through the wrappers' inputs, a loop's items and ``dsl.Collected`` outputs) plus its
``dependentTasks`` (an ``.after()``; a wrapper named there stands for the tasks inside it).
Airflow-only constructs and what they map to:

- ``expand`` over a plan ↔ ``dsl.ParallelFor`` over the plan's output (the mapped tasks are the
  ones inside a loop), the gather step reads ``dsl.Collected``.
- the teardown ``finish`` ↔ the exit task of a ``dsl.ExitHandler`` around every other task: KFP's
  exit task may depend on no task, so its one upstream is the handler, i.e. every other task. In
  Airflow ``finish`` has direct upstreams that reach all the others. So edges into ``finish`` are
  compared as "every other task comes before ``finish``", all other edges one for one.
- ``register`` skipping itself (and so ``promote``) when ``track`` is false ↔ ``dsl.If``.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import time

import pytest
import yaml

from components.orchestration.airflow_local import DAGS_FOLDER, REPO
from tests.dags import test_dag_integrity as integrity

KFP_PYTHON = REPO / ".venv-kfp" / "bin" / "python"
PIPELINE = REPO / "dags" / "kubeflow" / "pipeline.py"
GPU_TASKS = {"train_captioner", "train_vae", "sweep_point", "train_evaluator"}
PARAM_TYPES = {  # Airflow Param JSON-schema type -> KFP parameterType
    "string": "STRING",
    "array": "LIST",
    "boolean": "BOOLEAN",
    "integer": "NUMBER_INTEGER",
    "number": "NUMBER_DOUBLE",
    "object": "STRUCT",
}
# The DAG's params as the DagBag reads them: name -> [JSON-schema type, default].
PARAMS_PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=sys.argv[1]).dags[sys.argv[2]]
params = {k: dag.params.get_param(k) for k in dag.params}
print(json.dumps({k: [p.schema.get("type"), p.value] for k, p in params.items()}, default=str))
"""


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    """The DAG read back by the DAG-integrity test's probe, plus its params' types."""
    home = tmp_path_factory.mktemp("airflow")
    graph = integrity.read_back(home, "tessera_pipeline")
    assert graph["errors"] == {}
    proc = subprocess.run(
        [sys.executable, "-c", PARAMS_PROBE, str(DAGS_FOLDER / "tessera_pipeline.py")]
        + ["tessera_pipeline"],
        env={"AIRFLOW_HOME": str(home), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    graph["params"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return graph


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    if not KFP_PYTHON.exists():
        pytest.fail(f"no {KFP_PYTHON}: run `make kfp` (kfp lives in its own environment)")
    out = tmp_path_factory.mktemp("kfp") / "tessera_pipeline.yaml"
    began = time.monotonic()
    proc = subprocess.run(
        [str(KFP_PYTHON), str(PIPELINE), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - began < 60  # about a second here
    return next(yaml.safe_load_all(out.read_text()))


# --------------------------------------------------------------------------- reading KFP's graph


class KfpGraph:
    """The leaf tasks of a compiled pipeline and their upstream tasks, wrappers removed."""

    def __init__(self, spec: dict):
        self.components = spec["components"]
        self.executors = spec["deploymentSpec"]["executors"]
        self.upstream: dict[str, set[str]] = {}
        self.tasks: dict[str, dict] = {}  # leaf task name -> its task spec
        self.loops: dict[str, str] = {}  # leaf task name -> the loop it runs in
        self._walk(spec["root"]["dag"], {}, loop=None)

    def component(self, task: dict) -> dict:
        return self.components[task["componentRef"]["name"]]

    def executor(self, name: str) -> dict:
        return self.executors[self.component(self.tasks[name])["executorLabel"]]["container"]

    def _leaves(self, dag: dict, name: str) -> set[str]:
        inner = self.component(dag["tasks"][name]).get("dag")
        if inner is None:
            return {name}
        return set().union(*(self._leaves(inner, sub) for sub in inner["tasks"]))

    def _produced(self, dag: dict, name: str, key: str) -> set[str]:
        inner = self.component(dag["tasks"][name]).get("dag")
        if inner is None:
            return {name}
        source = inner["outputs"]["parameters"][key]["valueFromParameter"]
        return self._produced(inner, source["producerSubtask"], source["outputParameterKey"])

    def _sources(self, dag: dict, value: dict, context: dict[str, set[str]]) -> set[str]:
        if "taskOutputParameter" in value:
            out = value["taskOutputParameter"]
            return self._produced(dag, out["producerTask"], out["outputParameterKey"])
        if "componentInputParameter" in value:
            return context.get(value["componentInputParameter"], set())
        if "taskFinalStatus" in value:  # the exit task: after everything in the handler
            return self._leaves(dag, value["taskFinalStatus"]["producerTask"])
        return set()  # a constant

    def _walk(self, dag: dict, context: dict[str, set[str]], loop: str | None) -> None:
        for name, task in dag["tasks"].items():
            inputs = task.get("inputs", {}).get("parameters", {})
            sources = {k: self._sources(dag, v, context) for k, v in inputs.items()}
            after = set().union(*(self._leaves(dag, d) for d in task.get("dependentTasks", [])))
            inner = self.component(task).get("dag")
            if inner is None:
                self.tasks[name] = task
                self.upstream[name] = set().union(after, *sources.values())
                if loop:
                    self.loops[name] = loop
                continue
            iterator = task.get("parameterIterator")
            if iterator:  # a loop's item comes from its items' producer
                sources[iterator["itemInput"]] = sources[iterator["items"]["inputParameter"]]
            before = set(self.upstream)
            self._walk(inner, sources, loop=name if iterator else loop)
            # a wrapper's own dependencies must be those of the tasks inside it
            explained = set().union(*(self.upstream[t] for t in set(self.upstream) - before))
            assert after <= explained, f"{name} depends on {after - explained} for no inner task"

    def edges(self) -> set[tuple[str, str]]:
        return {(up, name) for name, ups in self.upstream.items() for up in ups if up != name}


def airflow_id(name: str) -> str:
    return name.replace("-", "_")


@pytest.fixture(scope="module")
def kfp(compiled) -> KfpGraph:
    return KfpGraph(compiled)


# --------------------------------------------------------------------------- the tests


def test_same_tasks_as_the_airflow_dag(kfp, airflow):
    assert sorted(airflow_id(t) for t in kfp.tasks) == airflow["tasks"]
    mapped = sorted(airflow_id(t) for t in kfp.loops)
    assert mapped == airflow["mapped"]
    assert {"caption_shard", "encode_shard", "sweep_point"} <= set(mapped)


def test_same_edges_as_the_airflow_dag(kfp, airflow):
    ours = {(airflow_id(a), airflow_id(b)) for a, b in kfp.edges()}
    theirs = {tuple(e) for e in airflow["edges"]}
    into_finish = {e for e in ours | theirs if e[1] == "finish"}
    assert sorted(ours - into_finish) == sorted(theirs - into_finish)
    others = set(airflow["tasks"]) - {"finish"}
    assert {a for a, b in ours if b == "finish"} == others  # the exit handler wraps them all
    assert _ancestors(theirs, "finish") == others  # the teardown comes after them all
    assert airflow["teardowns"] == ["finish"]
    assert kfp.tasks["finish"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def _ancestors(edges: set[tuple[str, str]], task: str) -> set[str]:
    found, frontier = set(), {task}
    while frontier:
        frontier = {a for a, b in edges if b in frontier} - found
        found |= frontier
    return found


def test_parameters_are_typed_like_the_dag_params(compiled, airflow):
    ours = compiled["root"]["inputDefinitions"]["parameters"]
    theirs = {}
    for name, (kind, default) in airflow["params"].items():
        kind = [k for k in kind if k != "null"][0] if isinstance(kind, list) else kind
        theirs[name] = {"parameterType": PARAM_TYPES[kind], "default": default}
    assert {k: v["parameterType"] for k, v in ours.items()} == {
        k: v["parameterType"] for k, v in theirs.items()
    }
    assert {k: v.get("defaultValue") for k, v in ours.items()} == {
        k: v["default"] for k, v in theirs.items()
    }
    assert {"profile", "overrides", "source", "captions", "track"} <= set(ours)
    assert ours["overrides"]["parameterType"] == "LIST"
    assert ours["track"]["parameterType"] == "BOOLEAN"


def test_training_tasks_request_a_gpu(kfp):
    for name in kfp.tasks:
        resources = kfp.executor(name)["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"], name
        if airflow_id(name) in GPU_TASKS:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", name
            assert resources["accelerator"]["resourceCount"] == "1", name
        else:
            assert "accelerator" not in resources, name


def test_every_task_retries_like_its_airflow_task(kfp, airflow):
    for name, task in kfp.tasks.items():
        policy = task["retryPolicy"]  # set on purpose everywhere, 0 included
        assert policy.get("maxRetryCount", 0) == airflow["retries"][airflow_id(name)], name
        assert policy["backoffDuration"] == "300s", name
    assert airflow["retries"]["sweep_point"] == 2 and airflow["retries"]["finish"] == 0


def airflow_arguments() -> dict[str, list[str]]:
    """Each Airflow task's upstream arguments (its callable's, less run / params / ti / outlets)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pipeline_dag", DAGS_FOLDER / "tessera_pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = {}
    for task in module.pipeline_dag.tasks:
        names = inspect.signature(task.python_callable).parameters
        found[task.task_id] = [
            n for n in names if n not in ("run", "params", "ti", "outlet_events")
        ]
    return found


def test_every_task_runs_its_airflow_body_through_the_tessera_cli(kfp, airflow):
    from components.orchestration.tasks import DAG_TASKS

    arguments = airflow_arguments()
    for name in kfp.tasks:
        container = kfp.executor(name)
        assert container["image"] == "tessera:0.1.0", name
        command = container["command"]
        task_id = airflow_id(name)
        assert command[:3] == ["tessera", "task", task_id], name
        for flag in ("--params", "--run", "--output"):
            assert flag in command, (name, flag)
        if task_id in ("start", "finish"):
            assert "--upstream" not in command, name
        else:
            assert task_id in DAG_TASKS, name
            upstream = command[command.index("--upstream") + 1]
            keys = re.findall(r'"(\w+)": ', upstream)
            assert keys == arguments[task_id], (name, keys)  # the Airflow task's arguments
        params = command[command.index("--params") + 1]
        for param in airflow["params"]:  # every DAG param reaches every task
            assert f"{{{{$.inputs.parameters['param_{param}']}}}}" in params, (name, param)
        assert not kfp.tasks[name].get("cachingOptions", {}).get("enableCache"), name


def test_the_dag_processor_skips_the_kubeflow_folder(tmp_path):
    """dags/.airflowignore: the twin imports kfp, which Airflow's environment does not have."""
    probe = "import json, sys; from airflow.utils.file import list_py_file_paths as ls; "
    probe += "print(json.dumps(ls(sys.argv[1])))"
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(DAGS_FOLDER)],
        env={"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(p.endswith("tessera_pipeline.py") for p in found), found
    assert not [p for p in found if "/kubeflow/" in p], found
