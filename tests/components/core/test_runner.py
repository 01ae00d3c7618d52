"""The runner: steps as idempotent tracked transactions, checkpoints injected, steps in parts."""

from __future__ import annotations

import json

import pytest

from components.core import runner, storage
from components.core.config import load_config
from components.core.runner import RunContext, StepResult, StepSpec

CALLS: list[str] = []


def make(cfg, workdir, n: int) -> StepResult:
    CALLS.append("make")
    (workdir / "out.txt").write_text("x" * n)
    return StepResult(
        files={"out": "out.txt"}, values={"n": n}, metrics={"n": n}, artifacts=["out.txt"]
    )


@pytest.fixture
def mlflow_env(mlflow_server, tessera_home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return mlflow_server


def test_run_step_is_idempotent_and_tracked(mlflow_env):
    import mlflow

    cfg, ctx = load_config("tiny"), RunContext("idem-1", "test_runner")
    before = len(CALLS)
    out = runner.run_step(StepSpec("make", make), cfg, ctx, n=4)
    assert storage.read_text(out["out"]) == "xxxx"
    assert out["n"] == 4 and storage.is_committed(out["step_uri"])
    again = runner.run_step(StepSpec("make", make), cfg, ctx, n=4)
    assert again == out and len(CALLS) == before + 1  # second call is a no-op
    assert runner.latest_outputs(cfg, "make") == out
    run = mlflow.get_run(out["mlflow_run_id"])
    assert run.data.metrics["n"] == 4.0 and run.data.tags["tessera.step"] == "make"


def test_checkpoints_are_passed_and_checks_run_before_any_work(tessera_home):
    seen = {}

    def train(cfg, workdir, checkpoint_dir):
        seen["checkpoint_dir"] = checkpoint_dir
        return StepResult(values={"ok": True})

    def check(cfg):
        if cfg.train_vae.train.steps > 100:
            raise ValueError("train_vae.train.steps is too many for this test")

    spec = StepSpec("train_thing", train, checkpoints=True, check=check)
    ctx = RunContext("ckpt-1", track=False)
    runner.run_step(spec, load_config("tiny"), ctx)
    assert seen["checkpoint_dir"] == tessera_home / "checkpoints" / "ckpt-1" / "train_thing"
    bad = load_config("tiny", ["train_vae.train.steps=1000"])
    with pytest.raises(ValueError, match="too many"):
        runner.run_step(spec, bad, RunContext("ckpt-2", track=False))
    assert not storage.exists(runner.step_uri(bad, "ckpt-2", "train_thing"))


def test_a_failed_step_commits_nothing(tessera_home):
    def broken(cfg, workdir):
        (workdir / "half.txt").write_text("half")
        raise RuntimeError("died")

    cfg, ctx = load_config("tiny"), RunContext("fail-1", track=False)
    with pytest.raises(RuntimeError, match="died"):
        runner.run_step(StepSpec("broken", broken), cfg, ctx)
    out = runner.step_uri(cfg, "fail-1", "broken")
    assert not storage.exists(out) and runner.committed_outputs(out) is None


def plan(cfg, words: list[str]) -> list[dict]:
    return [{"word": w} for w in words]


def part(cfg, workdir, piece: dict, words: list[str]) -> StepResult:
    CALLS.append(f"part {piece['word']}")
    (workdir / "word.txt").write_text(piece["word"])
    return StepResult(
        files={"word": "word.txt"},
        values={"index": piece["index"]},
        metrics={"len": len(piece["word"])},
    )


def gather(cfg, workdir, parts: list[dict]) -> StepResult:
    CALLS.append("gather")
    words = [storage.read_text(p["word"]) for p in sorted(parts, key=lambda p: p["index"])]
    (workdir / "all.txt").write_text(" ".join(words))
    return StepResult(files={"all": "all.txt"}, values={"parts": len(parts)})


WORDS = StepSpec("words", gather, plan=plan, part=part)


def test_a_step_in_parts_commits_each_part_and_reports_them_in_its_run(mlflow_env):
    import mlflow

    cfg, ctx = load_config("tiny"), RunContext("parts-1", "test_runner")
    assert runner.plan_parts(WORDS, cfg, words=["a", "bb"]) == [
        {"word": "a", "index": 0},
        {"word": "bb", "index": 1},
    ]
    out = runner.run_in_process(WORDS, cfg, ctx, words=["a", "bb", "ccc"])
    assert storage.read_text(out["all"]) == "a bb ccc" and out["parts"] == 3
    first = runner.part_uri(cfg, "parts-1", "words", {"index": 0})
    assert storage.is_committed(first)
    assert json.loads(storage.read_text(storage.join(first, runner.OUTPUTS)))["metrics"] == {
        "len": 1.0
    }
    history = mlflow.MlflowClient().get_metric_history(out["mlflow_run_id"], "part/len")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 2.0), (2, 3.0)]


def test_a_retried_step_in_parts_redoes_only_the_missing_parts(tessera_home):
    cfg, ctx = load_config("tiny"), RunContext("parts-2", track=False)
    pieces = runner.plan_parts(WORDS, cfg, words=["a", "bb"])
    runner.run_part(WORDS, cfg, ctx, pieces[0], words=["a", "bb"])  # then the task died
    CALLS.clear()
    runner.run_in_process(WORDS, cfg, ctx, words=["a", "bb"])
    assert CALLS == ["part bb", "gather"]
    CALLS.clear()
    runner.run_in_process(WORDS, cfg, ctx, words=["a", "bb"])
    assert CALLS == []  # a finished step in parts is a no-op too
