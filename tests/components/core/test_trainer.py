"""The DeepSpeed trainer: real engines, gloo, checkpoints that resume exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

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


# --------------------------------------------------------------------------- ZeRO 1, 2, 3


def zero_file(tmp_path, stage: int) -> str:
    """The DeepSpeed file of ``stage`` as a test runs it: ``infra/deepspeed/zero{stage}``; for
    stage 3 with ``stage3_param_persistence_threshold: 0`` (the file's 1e5 keeps tensors this
    small whole on every rank: nothing would be partitioned)."""
    if stage < 3:
        return f"zero{stage}"
    config = json.loads((TrainConfig.deepspeed_dir() / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3-partition-all.json"
    path.write_text(json.dumps(config))
    return str(path)


def _zero_payload(tmp_path, name, stage, procs, **train):
    base = {"micro_batch": 2, "grad_accum": 2 // procs, "grad_clip": 1.0, "ema_decay": 0.5}
    base.update(train)
    return _payload(tmp_path, name, deepspeed=zero_file(tmp_path, stage), **base)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # 1 and 2: the DiT runs of test_train_dit_zero.py
def test_two_processes_under_zero_match_one_with_ema_and_clipping(tmp_path, stage):
    one = _run(tmp_path, _zero_payload(tmp_path, "one", stage, 1), 1)  # grad_accum 2
    two = _run(tmp_path, _zero_payload(tmp_path, "two", stage, 2), 2)
    assert one["zero_stage"] == two["zero_stage"] == stage and two["world_size"] == 2
    assert two["partitioned"] == (stage == 3)  # ZeRO-3 modules hold placeholders only
    assert two["step"] == one["step"] == 6
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert None not in one["grad_norms"] and max(one["grad_norms"]) > 1.0  # clipping at 1.0
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    for key in ("weight", "bias", "raw_weight"):  # the EMA, and the live weights
        assert torch.allclose(torch.tensor(two[key]), torch.tensor(one[key]), atol=1e-5), key
    assert two["weight"] != pytest.approx(two["raw_weight"], abs=1e-4)  # the EMA lags


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3])  # 1: the universal-checkpoint test resumes ZeRO-1
def test_resume_under_zero_continues_the_uninterrupted_trajectory(tmp_path, stage):
    full = _run(tmp_path, _zero_payload(tmp_path, "full", stage, 2), 2)
    split = _zero_payload(tmp_path, "split", stage, 2)
    first = _run(tmp_path, {**split, "stop_at": 3}, 2)
    second = _run(tmp_path, split, 2)
    assert first["losses"] == pytest.approx(full["losses"][:3], rel=1e-6)
    assert second["losses"] == pytest.approx(full["losses"][3:], rel=1e-5)
    for key in ("weight", "bias", "raw_weight"):
        assert second[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key
    done = json.loads((tmp_path / "split" / "ckpt" / "step-0000006" / "COMPLETE").read_text())
    assert done["world_size"] == 2 and done["zero_stage"] == stage


@pytest.mark.slow
@pytest.mark.fault("security: pickles and damaged checkpoints")
def test_a_zero_checkpoint_resumes_on_another_process_count_once_made_universal(tmp_path):
    """ZeRO >= 1 partitions the optimizer state per rank: resuming a 2-process checkpoint on 1
    process is refused, naming the conversion; the conversion is sealed, so a pickle planted in
    it afterwards is refused before DeepSpeed unpickles anything; after it the run continues
    exactly."""
    import subprocess
    import sys

    from components.core.trainer import TrainingFailed
    from tests.faults.test_checkpoints import plant

    full = _run(tmp_path, _zero_payload(tmp_path, "full", 1, 2), 2)
    _run(tmp_path, {**_zero_payload(tmp_path, "split", 1, 2), "stop_at": 3}, 2)
    on_one = _zero_payload(tmp_path, "split", 1, 1)
    with pytest.raises(TrainingFailed, match=r"written by 2 process\(es\) under ZeRO stage 1"):
        _run(tmp_path, on_one, 1)
    log = (tmp_path / "logs" / "train.log").read_text()
    line = next(line for line in log.splitlines() if "tessera checkpoint universal" in line)
    command = line[line.index("tessera checkpoint") :].split()  # after the traceback's "[rank0]:"
    assert "load_universal" in log
    tessera = str(Path(sys.executable).with_name("tessera"))
    done = subprocess.run([tessera, *command[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    universal = tmp_path / "split" / "ckpt" / "step-0000003-universal"
    assert f"wrote {universal} (sealed)" in done.stdout
    import shutil

    marker, kept = tmp_path / "executed", tmp_path / "kept.pt"
    (states,) = universal.glob("*model_states.pt")  # what DeepSpeed unpickles first
    shutil.copy(states, kept)
    plant(states, marker)  # a live pickle payload in its place: unpickling it makes the marker
    with pytest.raises(TrainingFailed, match="not a sealed universal copy"):
        _run(tmp_path, on_one, 1)
    assert not marker.exists()
    assert "does not match its sealed sha256" in (tmp_path / "logs" / "train.log").read_text()
    shutil.copy(kept, states)
    resumed = _run(tmp_path, on_one, 1)
    assert resumed["world_size"] == 1 and resumed["step"] == 6
    assert resumed["losses"] == pytest.approx(full["losses"][3:], rel=1e-5)
    for key in ("weight", "bias", "raw_weight"):
        assert resumed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_a_stage0_checkpoint_resumes_on_any_process_count(tmp_path):
    full = _run(tmp_path, _zero_payload(tmp_path, "full", 0, 1), 1)
    _run(tmp_path, {**_zero_payload(tmp_path, "split", 0, 2), "stop_at": 3}, 2)
    resumed = _run(tmp_path, _zero_payload(tmp_path, "split", 0, 1), 1)
    assert resumed["losses"] == pytest.approx(full["losses"][3:], rel=1e-5)
    assert resumed["weight"] == pytest.approx(full["weight"], rel=1e-5, abs=1e-6)


def test_the_deepspeed_launcher_runs_the_same_workers(tmp_path):
    out = tmp_path / "env.json"
    payload = {"out": str(out), "names": ["RANK", "WORLD_SIZE", "OMP_NUM_THREADS"]}
    launch(
        "tests.testing_utils.deepspeed:environment",
        payload,
        2,
        tmp_path / "env.log",
        launcher="deepspeed",
    )
    env = json.loads(out.read_text())  # rank 0 writes last or first: both ranks ran
    assert env["WORLD_SIZE"] == "2" and env["RANK"] in ("0", "1") and env["OMP_NUM_THREADS"]


def test_deepspeed_files_fill_in_what_train_config_owns():
    train = TrainConfig(micro_batch=3, grad_accum=2, grad_clip=0.5, deepspeed="zero2")
    config = trainer.deepspeed_config(train, world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 2 and config["train_batch_size"] == 24
    assert config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is trainer.bf16_weights(train)
    assert config["zero_optimization"]["stage"] == train.zero_stage == 2
    assert config["zero_allow_untested_optimizer"] is True  # torch's fused AdamW under ZeRO
    names = sorted(p.stem for p in TrainConfig.deepspeed_dir().glob("*.json"))
    assert names == [
        "zero0",
        "zero1",
        "zero2",
        "zero2-bf16",
        "zero2-offload",
        "zero3",
        "zero3-bf16",
        "zero3-offload",
    ]
    for name in names:  # every file validates and leaves "auto" only where the trainer fills
        TrainConfig(deepspeed=name)
    offload = TrainConfig(deepspeed="zero3-offload").deepspeed_file()["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 weights are right on CUDA")
def test_a_bf16_file_on_cpu_names_the_file_to_use():
    with pytest.raises(ValueError, match="zero2 instead of zero2-bf16"):
        trainer.deepspeed_config(TrainConfig(deepspeed="zero2-bf16", precision="fp32"), 1)


def test_deepspeed_file_errors_name_the_fix(tmp_path):
    from components.core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train_dit.train: deepspeed='zero5'.*'zero3-offload'"):
        load_config("tiny", ["train_dit.train.deepspeed=zero5"])
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {}}))
    with pytest.raises(ValueError, match=r"sets train_micro_batch_size_per_gpu=8; TrainConfig"):
        TrainConfig(deepspeed=str(fixed))
    fixed.write_text(json.dumps({"gradient_clipping": 1.0}))
    with pytest.raises(ValueError, match=r"gradient_clipping=1.0; TrainConfig sets it"):
        TrainConfig(deepspeed=str(fixed))
    fixed.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig(deepspeed=str(fixed))
    fixed.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ValueError, match=r"stage must be 0, 1, 2 or 3 .* got 4"):
        TrainConfig(deepspeed=str(fixed))
    fixed.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ValueError, match=r"zero_optimization.reduce_bucket_size"):
        TrainConfig(deepspeed=str(fixed))
    fixed.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="builds AdamW"):
        TrainConfig(deepspeed=str(fixed))
    fixed.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    assert TrainConfig(deepspeed=str(fixed)).zero_stage == 3  # a path works like a name
