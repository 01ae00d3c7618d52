"""The CLI as users meet it: --help everywhere, clear errors, real commands."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from components.cli import app, main

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
        main()
    assert exit_info.value.code == 2
    assert "unknown key ingest.wokers" in capsys.readouterr().err


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
