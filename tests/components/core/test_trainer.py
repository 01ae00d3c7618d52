"""The DeepSpeed trainer: real engines, gloo, checkpoints that resume exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from components.core import trainer
from components.core.config import TrainConfig, to_dict
from components.core.trainer import ResumableSampler, launch, lr_lambda, maybe_autocast, precision


def test_sampler_is_deterministic_sharded_and_resumable():
    full = [i for _, i in zip(range(50), ResumableSampler(7, seed=3), strict=False)]
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))
    r0 = [i for _, i in zip(range(25), ResumableSampler(7, 3, rank=0, world_size=2), strict=False)]
    r1 = [i for _, i in zip(range(25), ResumableSampler(7, 3, rank=1, world_size=2), strict=False)]
    assert r0 == full[0::2] and r1 == full[1::2]
    resumed = [i for _, i in zip(range(20), ResumableSampler(7, 3, start=30), strict=False)]
    assert resumed == full[30:50]


def test_lr_schedule_warms_up_then_decays():
    f = lr_lambda(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) < f(20)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of precision")
def test_cpu_bf16_is_autocast_over_fp32_weights():
    bf16 = TrainConfig(precision="bf16")
    assert precision(bf16) == "bf16" and not trainer.bf16_weights(bf16)
    w = torch.ones(3, 3)  # an fp32 weight stays fp32; its matmuls run in bf16
    with maybe_autocast(bf16):
        assert (torch.ones(2, 3) @ w).dtype == torch.bfloat16
    with maybe_autocast(TrainConfig(precision="fp32")):
        assert (torch.ones(2, 3) @ w).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side of precision")
def test_auto_precision_on_cpu_follows_the_measured_bf16_speed(monkeypatch):
    assert trainer.cpu_bf16_speedup() > 0  # measured (cached) on this machine
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: 3.5)  # AVX512-BF16 / AMX
    assert precision(TrainConfig()) == "bf16"
    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: 0.3)  # emulated bf16
    assert precision(TrainConfig()) == "fp32"
    assert precision(TrainConfig(precision="bf16")) == "bf16"  # pinned: not measured


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU precision is resolved by the launcher")
@pytest.mark.parametrize(("speedup", "expected"), [(3.5, "bf16"), (0.3, "fp32")])
def test_the_launchers_resolve_auto_precision_once_for_every_rank(
    monkeypatch, tmp_path, speedup, expected
):
    from components.core.config import load_config

    def payload(cfg):  # what run_workers hands every rank, for either trainer
        return trainer.build_payload(cfg, tmp_path, tmp_path / "ckpt", "r.json", latents="x")

    monkeypatch.setattr(trainer, "cpu_bf16_speedup", lambda: speedup)
    cfg = load_config("tiny", ["train_vae.train.precision=fp32"])  # the DiT's stays auto
    resolved = payload(cfg)["cfg"]
    assert resolved["train_dit"]["train"]["precision"] == expected
    assert resolved["train_vae"]["train"]["precision"] == "fp32"  # pinned values stay
    auto = payload(load_config("tiny"))
    assert auto["cfg"]["train_vae"]["train"]["precision"] == expected
    assert auto["latents"] == "x" and auto["result"] == str(tmp_path / "r.json")


def _payload(tmp_path, name, **train):
    base = {
        "steps": 6,
        "micro_batch": 4,
        "lr": 0.05,
        "warmup_steps": 0,
        "schedule": "constant",
        "checkpoint_every": 3,
        "grad_clip": 0.0,
    }
    base.update(train)
    return {
        "train": to_dict(TrainConfig(**base)),
        "checkpoint_dir": str(tmp_path / name / "ckpt"),
        "out": str(tmp_path / f"{name}.json"),
    }


def _run(tmp_path, payload, procs):
    launch("tests.testing_utils.deepspeed:worker", payload, procs, tmp_path / "logs" / "train.log")
    return json.loads(open(payload["out"]).read())


@pytest.mark.slow
def test_resume_continues_the_uninterrupted_trajectory(tmp_path):
    full = _run(tmp_path, _payload(tmp_path, "full"), 1)
    interrupted = _payload(tmp_path, "split")
    first = _run(tmp_path, {**interrupted, "stop_at": 3}, 1)  # "killed" after the step-3 checkpoint
    second = _run(tmp_path, interrupted, 1)  # a retry: resumes from step 3
    assert first["losses"] == pytest.approx(full["losses"][:3], rel=1e-6)
    assert second["losses"] == pytest.approx(full["losses"][3:], rel=1e-5)
    assert second["weight"] == pytest.approx(full["weight"], rel=1e-5)
    torch.manual_seed(123)
    init = torch.nn.Linear(4, 1).weight.flatten()
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])
    assert (torch.tensor(full["weight"]) - target).norm() < (init - target).norm()  # it learns


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path):
    one = _run(tmp_path, _payload(tmp_path, "one", micro_batch=4), 1)
    two = _run(tmp_path, _payload(tmp_path, "two", micro_batch=2), 2)
    assert two["step"] == one["step"] == 6
    assert torch.allclose(torch.tensor(two["weight"]), torch.tensor(one["weight"]), atol=1e-5)
    assert torch.allclose(torch.tensor(two["bias"]), torch.tensor(one["bias"]), atol=1e-5)


@pytest.mark.slow
def test_a_diverging_loss_stops_training_before_it_reaches_the_weights(tmp_path):
    from components.core.trainer import TrainingFailed

    payload = {**_payload(tmp_path, "nan", checkpoint_every=2), "nan_at": 3}
    with pytest.raises(TrainingFailed, match=r"the loss is nan at step 3 .*train\.lr"):
        _run(tmp_path, payload, 1)
    done = sorted(p.parent.name for p in (tmp_path / "nan" / "ckpt").glob("step-*/COMPLETE"))
    assert done == ["step-0000002"]  # the last clean checkpoint; a fixed retry resumes there
    resumed = _run(tmp_path, {**payload, "nan_at": None}, 1)
    assert resumed["step"] == 6 and all(map(math.isfinite, resumed["losses"]))


def test_failing_worker_reports_its_log(tmp_path):
    from components.core.trainer import TrainingFailed

    with pytest.raises(TrainingFailed, match="full log"):
        launch("tests.testing_utils.deepspeed:no_such_entry", {}, 1, tmp_path / "fail.log")


def test_workers_get_the_kernel_cache_and_malloc_settings(tessera_home, tmp_path, monkeypatch):
    """Launched processes keep compiled kernels under TESSERA_HOME (even after inductor exported
    its /tmp default in this process) and freed memory in the heap (trainer.MALLOC_ENV, where an
    exported value wins)."""
    from components.core.trainer import MALLOC_ENV

    monkeypatch.setenv("MALLOC_TOP_PAD_", "12345")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_root")  # inductor's own
    out = tmp_path / "env.json"
    names = ["TORCHINDUCTOR_CACHE_DIR", *MALLOC_ENV]
    payload = {"out": str(out), "names": names}
    launch("tests.testing_utils.deepspeed:environment", payload, 1, tmp_path / "env.log")
    env = json.loads(out.read_text())
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tessera_home / "cache" / "inductor")
    assert env["MALLOC_MMAP_THRESHOLD_"] == MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert env["MALLOC_TRIM_THRESHOLD_"] == MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]
    assert env["MALLOC_TOP_PAD_"] == "12345"
