"""Kubernetes mode: the training tasks as ``KubernetesPodOperator`` pods in the Tessera image.

With Airflow config ``[tessera] task_mode = kubernetes`` (``AIRFLOW__TESSERA__TASK_MODE``), read
when a DAG file is parsed, the DAGs build their training tasks (:data:`POD_STEPS`) with
:func:`pod_operator` instead of Python tasks. The pod runs the same component code with the same
arguments through ``tessera task STEP --params ... --run ... --inputs ... --output
/airflow/xcom/return.json`` (:func:`task_arguments`); the operator's XCom sidecar returns that
file as the task's XCom, so downstream tasks see what the local task would have returned.

Pod settings come from the ``[tessera]`` section (:class:`PodSettings`, defaults in
:data:`DEFAULTS`); the pod template ``infra/kubernetes/pod-template.yaml`` holds what is the
same for every pod (the store volume, credentials from a Secret via ``envFrom``).

Imported at DAG parse time: stdlib and Airflow only. The provider (its Kubernetes client takes
seconds to import) is imported only in kubernetes mode.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

SECTION = "tessera"
MODES = ("local", "kubernetes")
POD_STEPS = ("train_captioner", "train_vae", "sweep_point", "train_evaluator")
XCOM_RETURN = "/airflow/xcom/return.json"  # where KubernetesPodOperator's sidecar reads XCom
POD_TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "kubernetes" / "pod-template.yaml"
DEFAULTS = {
    "task_mode": "local",
    "image": "tessera:0.1.0",
    "image_pull_policy": "IfNotPresent",
    "namespace": "tessera",
    "kubernetes_conn_id": "kubernetes_default",
    "service_account": "tessera",
    "pod_template_file": "",  # "" = infra/kubernetes/pod-template.yaml of this checkout
    "gpu_resource": "nvidia.com/gpu",
    "gpus": "1",  # per training pod; requests == limits (GPUs cannot be overcommitted)
    "cpu": "4",
    "memory": "32Gi",
    "node_selector": '{"nvidia.com/gpu.present": "true"}',  # JSON object
    "tolerations": '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
    "startup_timeout_s": "900",  # image pull + GPU node scale-up
}


def _conf(key: str) -> str:
    from airflow.sdk.configuration import conf

    return conf.get(SECTION, key, fallback=DEFAULTS[key])


def task_mode() -> str:
    """``local`` (a Python task launches DeepSpeed on the worker) or ``kubernetes`` (a pod)."""
    mode = _conf("task_mode").strip().lower()
    if mode not in MODES:
        raise ValueError(
            f"[{SECTION}] task_mode is {mode!r}; set AIRFLOW__TESSERA__TASK_MODE to one of {MODES}"
        )
    return mode


@dataclass(frozen=True)
class PodSettings:
    """The ``[tessera]`` options of a training pod."""

    image: str
    image_pull_policy: str
    namespace: str
    kubernetes_conn_id: str
    service_account: str
    pod_template_file: str
    gpu_resource: str
    gpus: int
    cpu: str
    memory: str
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    startup_timeout_s: int

    @classmethod
    def read(cls) -> PodSettings:
        def parsed(key: str, kind: type) -> Any:
            try:
                value = json.loads(_conf(key))
            except json.JSONDecodeError as exc:
                raise ValueError(f"[{SECTION}] {key} must be JSON: {exc}") from exc
            if not isinstance(value, kind):
                raise ValueError(f"[{SECTION}] {key} must be a JSON {kind.__name__}: {value!r}")
            return value

        return cls(
            image=_conf("image"),
            image_pull_policy=_conf("image_pull_policy"),
            namespace=_conf("namespace"),
            kubernetes_conn_id=_conf("kubernetes_conn_id"),
            service_account=_conf("service_account"),
            pod_template_file=_conf("pod_template_file") or str(POD_TEMPLATE),
            gpu_resource=_conf("gpu_resource"),
            gpus=int(_conf("gpus")),
            cpu=_conf("cpu"),
            memory=_conf("memory"),
            node_selector=parsed("node_selector", dict),
            tolerations=parsed("tolerations", list),
            startup_timeout_s=int(_conf("startup_timeout_s")),
        )


# --------------------------------------------------------------------------- arguments


def to_json(value: Any) -> str:
    """JSON of a template value (a DAG's ``tessera_json`` filter): Params and XCom mappings."""
    if isinstance(value, Mapping):
        value = {k: value[k] for k in value}
    return json.dumps(value, sort_keys=True, default=str)


TEMPLATE_FILTERS = {"tessera_json": to_json}  # the DAGs' user_defined_filters


class Pull(NamedTuple):
    """An input read from an upstream task's XCom when the pod's arguments are rendered:
    ``key`` of ``task_id``'s return value, or ``default`` when that task left none (skipped)."""

    task_id: str
    key: str
    default: Any = None

    def jinja(self) -> str:
        found = f"(ti.xcom_pull(task_ids={self.task_id!r}) or {{}})"
        return f"{found}.get({self.key!r}, {self.default!r})"


def task_arguments(
    step: str,
    *,
    params: str,
    run: str,
    inputs: str,
    plan: bool = False,
    part: str | None = None,
    output: str = XCOM_RETURN,
) -> list[str]:
    """The arguments of ``tessera task``: JSON strings (or templates that render to them)."""
    args = ["task", step]
    if plan:
        args.append("--plan")
    if part is not None:
        args += ["--part", part]
    return [*args, "--params", params, "--run", run, "--inputs", inputs, "--output", output]


def sweep_point_arguments(
    run: Mapping[str, Any], latents: str, vae: str, points: list, params: Mapping[str, Any]
) -> list[list[str]]:
    """One ``tessera task sweep --part`` argument list per planned sweep point."""
    inputs = to_json({"latents": latents, "vae": vae})
    return [
        task_arguments(
            "sweep", part=to_json(p), inputs=inputs, params=to_json(params), run=to_json(run)
        )
        for p in points
    ]


def templated_arguments(step: str, inputs: Mapping[str, Pull]) -> list[str]:
    """``tessera task`` arguments as Jinja templates: the DAG's params, the run handle of the
    ``start`` task and each input pulled from its upstream task's XCom."""
    fields = ", ".join(f"{name!r}: {pull.jinja()}" for name, pull in inputs.items())
    return task_arguments(
        step,
        params="{{ params | tessera_json }}",
        run="{{ ti.xcom_pull(task_ids='start') | tessera_json }}",
        inputs=f"{{{{ {{{fields}}} | tessera_json }}}}",
    )


# --------------------------------------------------------------------------- the operator


def pod_kwargs(task_id: str, settings: PodSettings | None = None) -> dict[str, Any]:
    """The ``KubernetesPodOperator`` arguments of training task ``task_id`` (all but its
    ``arguments``; Airflow's own task arguments such as pool and timeout are added by the
    caller, retries come from the DAG's default_args as for a local task)."""
    from kubernetes.client import models as k8s

    s = settings or PodSettings.read()
    resources = {s.gpu_resource: str(s.gpus), "cpu": s.cpu, "memory": s.memory}
    return {
        "task_id": task_id,
        "name": f"tessera-{task_id.replace('_', '-')}",
        "namespace": s.namespace,
        "kubernetes_conn_id": s.kubernetes_conn_id,
        "image": s.image,
        "image_pull_policy": s.image_pull_policy,
        "service_account_name": s.service_account or None,
        "pod_template_file": s.pod_template_file,
        "cmds": ["tessera"],
        "container_resources": k8s.V1ResourceRequirements(requests=resources, limits=resources),
        "node_selector": s.node_selector,
        "tolerations": [k8s.V1Toleration(**t) for t in s.tolerations],
        "labels": {"app.kubernetes.io/name": "tessera", "tessera.step": task_id},
        "do_xcom_push": True,
        "get_logs": True,
        "startup_timeout_seconds": s.startup_timeout_s,
        "on_finish_action": "delete_succeeded_pod",  # a failed pod stays for kubectl logs
    }


def pod_operator(
    task_id: str, arguments: list[str] | None = None, *, mapped: bool = False, **task_kwargs: Any
) -> Any:
    """A training task as a pod: ``KubernetesPodOperator(...)`` running ``tessera task``, or with
    ``mapped`` its ``.partial(...)`` (the caller expands ``arguments``)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    kwargs = {**pod_kwargs(task_id), **task_kwargs}
    if mapped:
        return KubernetesPodOperator.partial(**kwargs)
    return KubernetesPodOperator(arguments=arguments, **kwargs)
