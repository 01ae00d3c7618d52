"""The contract every pipeline step keeps, checked on a real, tracked run of the step.

A test class sets ``step`` (the :class:`~components.core.runner.StepSpec`), ``bad_config``
(overrides the step must refuse before doing any work) with ``bad_config_error`` (a regex of
the message, which names the key), optionally ``profile`` and ``overrides``, and provides a
class-scoped ``step_inputs`` fixture. :meth:`step_run` runs the step once per class, tracked by
the session's MLflow server, in its own ``TESSERA_HOME``; the class's other tests can use it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest

from components.core import runner, storage
from components.core.config import TesseraConfig, load_config
from components.core.runner import RunContext, StepSpec


@dataclasses.dataclass
class StepRun:
    cfg: TesseraConfig
    ctx: RunContext
    inputs: dict[str, Any]
    outputs: dict[str, Any]


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the step's work ran although the run must not reach it")


class StepTesterMixin:
    step: ClassVar[StepSpec]
    profile: ClassVar[str] = "tiny"
    overrides: ClassVar[tuple[str, ...]] = ()
    bad_config: ClassVar[tuple[str, ...]]
    bad_config_error: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # one xdist worker per class: the class-scoped step run happens once
        group = pytest.mark.xdist_group(f"step-{cls.step.name}")
        cls.pytestmark = [*getattr(cls, "pytestmark", []), group]

    @pytest.fixture(scope="class")
    def step_home(self, tmp_path_factory, mlflow_server):
        home = tmp_path_factory.mktemp(f"{self.step.name}-home")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TESSERA_HOME", str(home))
            mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
            yield home

    @pytest.fixture(scope="class")
    def step_run(self, step_home, step_inputs) -> StepRun:
        cfg = load_config(self.profile, list(self.overrides))
        ctx = RunContext.new("cli")
        return StepRun(
            cfg, ctx, step_inputs, runner.run_in_process(self.step, cfg, ctx, **step_inputs)
        )

    def test_outputs_are_committed(self, step_run):
        out = step_run.outputs
        assert storage.is_committed(out["step_uri"])
        recorded = json.loads(storage.read_text(storage.join(out["step_uri"], runner.OUTPUTS)))
        assert recorded == out
        files = [v for v in out.values() if isinstance(v, str) and v.startswith(out["step_uri"])]
        assert files and all(storage.exists(uri) for uri in files), files

    def test_rerun_is_a_no_op(self, step_run):
        outputs_json = storage.join(step_run.outputs["step_uri"], runner.OUTPUTS)
        before = storage.read_bytes(outputs_json)
        spec = dataclasses.replace(self.step, run=_refuse, part=self.step.part and _refuse)
        again = runner.run_in_process(spec, step_run.cfg, step_run.ctx, **step_run.inputs)
        assert again == step_run.outputs
        assert storage.read_bytes(outputs_json) == before

    def test_bad_config_fails_before_any_work(self, step_run):
        spec = dataclasses.replace(self.step, run=_refuse, part=self.step.part and _refuse)
        with pytest.raises(Exception, match=self.bad_config_error) as raised:
            cfg = load_config(self.profile, [*self.overrides, *self.bad_config])
            runner.run_in_process(spec, cfg, RunContext.new("cli"), **step_run.inputs)
        assert not isinstance(raised.value, AssertionError), raised.value

    def test_mlflow_run_is_tagged_with_the_step_name(self, step_run):
        import mlflow

        from components.core import tracking

        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        found = client.get_run(step_run.outputs["mlflow_run_id"])
        assert found.data.tags["tessera.step"] == self.step.name
        assert found.data.tags["tessera.run_id"] == step_run.ctx.run_id
        assert found.info.status == "FINISHED"

    def test_cli_command_is_the_step_name(self):
        from components.cli import app

        commands = {
            c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands
        }
        assert self.step.command in commands
