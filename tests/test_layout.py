"""The house rules, read from the source with ``ast`` (nothing is imported or run):

- import directions: ``model`` imports nothing of ours; ``evaluation`` -> ``model``;
  ``components.core`` -> ``model``, ``evaluation``; a step -> ``core`` (and its own package),
  never another step; ``orchestration`` and ``bench`` -> steps and below; ``dags/`` imports our
  code only inside task bodies, and only ``components.orchestration``, except the parse-time
  modules (:data:`PARSE_TIME`), whose own top-level imports are stdlib, Airflow or each other;
- ``model`` is PyTorch only: no PyAV, storage, tracking or orchestration libraries;
- every step module exports a ``STEP`` spec named after the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = ("model", "evaluation", "components", "dags", "tests")
NOT_IN_MODEL = ("av", "mlflow", "boto3", "botocore", "airflow", "great_expectations", "dvc")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(module, node, at top level) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    package = module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found += [(base, node, id(node) in top)]
            found += [(f"{base}.{alias.name}", node, id(node) in top) for alias in node.names]
    return found


def owner(module: str) -> str:
    """The layer of one of our modules: model, evaluation, core, steps.<name>, ..."""
    parts = module.split(".")
    if parts[0] != "components" or len(parts) == 1:
        return parts[0]
    if parts[1] == "steps" and len(parts) > 2:
        return f"steps.{parts[2]}"
    return parts[1]


# who may import whom (layers of ours; "steps.*" = any step)
ALLOWED = {
    "components": set(),
    "model": {"model"},
    "evaluation": {"model", "evaluation"},
    "core": {"model", "evaluation", "core", "components"},
    "orchestration": {"model", "evaluation", "core", "steps.*", "orchestration", "components"},
    "bench": {"model", "evaluation", "core", "steps.*", "bench", "components"},
    "cli": {"model", "evaluation", "core", "steps.*", "orchestration", "bench", "components"},
}


# a step that drives another: the sweep's points are train_dit runs (one way to train a DiT)
COMPOSES = {
    "steps.sweep": {"steps.train_dit"},  # its points are train_dit runs
    "steps.recaption_ablation": {"steps.evaluate"},  # its cells are colour-following runs
}


def allowed(importer: str, imported: str) -> bool:
    if importer.startswith("steps."):
        ours = {"model", "evaluation", "core", "components", importer, "steps"}
        return imported in ours | COMPOSES.get(importer, set())
    rules = ALLOWED[importer]
    return imported in rules or (imported.split(".")[0] == "steps" and "steps.*" in rules)


def source_files(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


@pytest.mark.parametrize(
    "path",
    source_files("model", "evaluation", "components"),
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_import_directions(path):
    importer = owner(module_name(path))
    wrong = [
        f"line {node.lineno}: {module}"
        for module, node, _ in imports(path)
        if module.split(".")[0] in OURS
        and module.split(".")[0] != "tests"
        and not allowed(importer, owner(module))
    ]
    assert not wrong, f"{importer} ({path.name}) may not import: {wrong}"


@pytest.mark.parametrize("path", source_files("model"), ids=lambda p: p.name)
def test_model_is_pytorch_only(path):
    wrong = [
        f"line {node.lineno}: {module}"
        for module, node, _ in imports(path)
        if module.split(".")[0] in NOT_IN_MODEL
    ]
    assert not wrong, wrong


# our modules a DAG file may import when it is parsed (the DAG integrity probe checks the rest)
PARSE_TIME = ("components.orchestration.dag_tasks", "components.orchestration.kubernetes")


def _parse_time(module: str) -> bool:
    return module in ("components", "components.orchestration") or any(
        module == m or module.startswith(f"{m}.") for m in PARSE_TIME
    )


KUBEFLOW = REPO / "dags" / "kubeflow"
AIRFLOW_DAGS = [p for p in source_files("dags") if KUBEFLOW not in p.parents]


@pytest.mark.parametrize("path", AIRFLOW_DAGS, ids=lambda p: p.name)
def test_dags_import_orchestration_inside_task_bodies_only(path):
    ours = [(m, node, top) for m, node, top in imports(path) if m.split(".")[0] in OURS]
    assert ours, "the DAG runs no step?"
    early = [m for m, _, top in ours if top and not _parse_time(m)]
    assert not early, f"our code is imported at DAG parse time: {early}"
    assert {m.split(".")[1] for m, _, _ in ours if m != "components"} == {"orchestration"}


@pytest.mark.parametrize("path", source_files("dags/kubeflow"), ids=lambda p: p.name)
def test_the_kubeflow_twin_imports_none_of_our_code(path):
    """It compiles in its own environment (make kfp), where none of our packages is installed:
    its containers call the `tessera` CLI instead."""
    assert [m for m, _, _ in imports(path) if m.split(".")[0] in OURS] == []


@pytest.mark.parametrize("module", PARSE_TIME)
def test_parse_time_modules_import_only_stdlib_and_airflow(module):
    import sys

    path = REPO / Path(*module.split(".")).with_suffix(".py")
    top = [m for m, _, at_top in imports(path) if at_top]
    wrong = [
        m
        for m in top
        if m.split(".")[0] not in sys.stdlib_module_names
        and m.split(".")[0] not in ("airflow", "__future__")
        and not _parse_time(m)
    ]
    assert not wrong, f"{module} is imported at DAG parse time and may not import {wrong}"


def step_modules() -> list[Path]:
    steps = REPO / "components" / "steps"
    return sorted(
        p if p.is_file() else p / "__init__.py"
        for p in steps.iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()
    )


@pytest.mark.parametrize("path", step_modules(), ids=lambda p: module_name(p))
def test_every_step_exports_a_spec_named_after_it(path):
    tree = ast.parse(path.read_text())
    specs = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "STEP" for t in node.targets)
    ]
    assert len(specs) == 1, "a step module defines STEP = StepSpec(...) once"
    call = specs[0]
    assert isinstance(call, ast.Call) and call.func.id == "StepSpec"
    assert ast.literal_eval(call.args[0]) == module_name(path).split(".")[-1]
