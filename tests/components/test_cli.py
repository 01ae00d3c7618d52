"""The CLI as users meet it: --help everywhere, clear errors, real commands."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from components.cli import app, cli

runner = CliRunner()

COMMANDS = [
    [],
    ["config"],
    ["demo-data"],
    ["ingest"],
    ["validate"],
    ["version"],
    ["dataset"],
    ["dataset", "checkout"],
    ["run"],
    ["demo"],
    ["mlflow-server"],
    ["bench"],
    ["generate"],
    ["edit"],
    ["evaluate"],
    ["train-evaluator"],
    ["train-vae"],
    ["encode"],
    ["train-dit"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "tessera")
def test_every_command_has_help(cmd):
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_config_override_and_error(capsys, monkeypatch):
    result = runner.invoke(app, ["config", "-p", "tiny", "--set", "ingest.workers=7"])
    assert result.exit_code == 0
    assert "workers: 7" in result.output
    monkeypatch.setattr("sys.argv", ["tessera", "config", "--set", "ingest.wokers=1"])
    with pytest.raises(SystemExit) as exit_info:
        cli()
    assert exit_info.value.code == 2
    assert "unknown key ingest.wokers" in capsys.readouterr().err


def test_the_tessera_command_exits_with_its_status_and_flushed_output(tmp_path):
    """The installed entry point ends with os._exit after Python-level shutdown (no SIGABRT
    from Arrow's thread pools at finalisation): its status, piped output and atexit work stay."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tessera = str(Path(sys.executable).with_name("tessera"))
    env = {**os.environ, "TESSERA_HOME": str(tmp_path)}
    ok = subprocess.run(
        [tessera, "config", "-p", "tiny"], env=env, capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert "workers:" in ok.stdout and ok.stdout.endswith("\n")  # piped, fully flushed
    bad = subprocess.run(
        [tessera, "config", "--set", "ingest.wokers=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "unknown key ingest.wokers" in bad.stderr
    # atexit handlers still run: a command's MLflow/logging flushes are not skipped
    script = (
        "import atexit, sys; from components import cli; "
        "atexit.register(lambda: print('atexit ran', flush=True)); "
        "sys.argv = ['tessera', 'config', '-p', 'tiny']; cli.main()"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.rstrip().endswith("atexit ran")


def test_bench_writes_results(tessera_home):
    result = runner.invoke(
        app, ["bench", "--only", "calibration", "-p", "tiny", "--set", "bench.matmul_size=128"]
    )
    assert result.exit_code == 0, result.output
    records = json.loads((tessera_home / "bench" / "results.json").read_text())
    by_name = {r["name"]: r for r in records}
    assert sorted(by_name) == ["calibration.matmul_bf16", "calibration.matmul_fp32"]
    record = by_name["calibration.matmul_fp32"]
    assert record["value"] > 0 and record["peer"] == "numpy.matmul" and record["ratio"] > 0
    assert record["machine"]["cores"] >= 1
    assert by_name["calibration.matmul_bf16"]["peer"] == "torch.matmul fp32"


def test_a_step_command_runs_the_step_and_prints_its_outputs(tessera_home):
    args = ["demo-data", "-p", "tiny", "--no-track", "--run-id", "cli-1"]
    result = runner.invoke(app, [*args, "--set", "demo_data.include_real_clips=false"])
    assert result.exit_code == 0, result.output
    outputs = json.loads(result.output)
    assert outputs["step_uri"] == str(tessera_home / "store" / "runs" / "cli-1" / "demo_data")
    assert outputs["num_videos"] == 6 and outputs["mlflow_run_id"] is None
    again = runner.invoke(app, args)  # the same run id: the committed step, whatever the config
    assert json.loads(again.output) == outputs
