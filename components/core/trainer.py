"""DeepSpeed training infrastructure shared by the VAE and DiT trainers.

- :func:`run_workers` is how a training step trains: it writes the payload (the config with its
  precision resolved once for every rank, the step's inputs, where to write), :func:`launch` starts
  ``N`` processes with ``torchrun`` (gloo on CPU, NCCL on GPU) running ``python -m
  components.core.trainer ENTRY PAYLOAD``, keeps their log beside the checkpoints (it survives a
  failed attempt) and returns what rank 0 wrote; multi-node runs use the same entry under the
  ``deepspeed`` launcher or ``torchrun --nnodes``.
- :class:`Trainer` wraps a DeepSpeed engine: AdamW + warm-up/cosine schedule, gradient clipping
  and precision from :class:`TrainConfig`, ZeRO 0-3 from the DeepSpeed file it names
  (``train.deepspeed``: ``infra/deepspeed/*.json``, completed by :func:`deepspeed_config`),
  optional EMA weights (gathered under ZeRO-3), checkpoints every N steps that hold everything a
  resume needs (weights, optimizer, scheduler, RNG of every rank, data position, the process
  count and ZeRO stage they were written with) and only rank 0 talks to MLflow.
- :class:`ResumableSampler` gives every rank a deterministic, resumable stream of indices.

Checkpoints live outside the step's staging directory (``checkpoint_dir``), so a retried task
resumes from the latest one instead of starting over.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from components.core import faults
from components.core.compile import cache_env
from components.core.config import Environment, TesseraConfig, TrainConfig, to_dict
from components.core.hardware import CPU_BF16_MIN_SPEEDUP, cpu_bf16_speedup

T = TypeVar("T")

# Lines of the workers' output echoed to the launching process (the Airflow task log, the CLI):
# progress and results; DeepSpeed's and torchrun's chatter stays in the step's log file.
PROGRESS_PREFIXES = (
    b"train_vae:",
    b"train_dit:",
    b"train_evaluator:",
    b"train_captioner:",
    b"resumed from checkpoint",
    b"[rank0]:",
    b"Traceback",
)


# ds_to_universal's output for checkpoint step-0000100 goes to step-0000100-universal
UNIVERSAL_SUFFIX = "-universal"


class TrainingFailed(RuntimeError):
    """A training process exited with an error; the message points at its log."""


class TrainingDiverged(RuntimeError):
    """The loss went non-finite; raised before it reaches the weights or a checkpoint."""


# --------------------------------------------------------------------------- launching


def build_payload(
    cfg: TesseraConfig,
    out_dir: Path,
    checkpoint_dir: Path,
    result_name: str,
    *,
    mlflow_run_id: str | None = None,
    stop_at: int | None = None,
    **inputs: Any,
) -> dict[str, Any]:
    """What a training worker reads (JSON): ``cfg`` with ``precision: auto`` resolved
    (:func:`resolve_precision`), ``out_dir`` (rank 0 writes the model there), ``result`` (the
    JSON file of the run's numbers), ``checkpoint_dir``, ``mlflow_run_id``, ``stop_at`` (stop
    after that step with a checkpoint, as a pre-empted run would) and the step's ``inputs``."""
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in inputs.items()}
    return {
        "cfg": to_dict(resolve_precision(cfg)),
        "out_dir": str(out_dir),
        "result": str(Path(out_dir) / result_name),
        "checkpoint_dir": str(checkpoint_dir),
        "mlflow_run_id": mlflow_run_id,
        "stop_at": stop_at,
        **plain,
    }


def run_workers(
    entry: str,
    cfg: TesseraConfig,
    train: TrainConfig,
    workdir: Path,
    checkpoint_dir: Path,
    *,
    log_name: str,
    result_name: str,
    **inputs: Any,
) -> dict[str, Any]:
    """Train a step: ``entry`` on ``train.num_processes`` processes, logging into the active
    MLflow run; returns the result JSON rank 0 wrote into ``workdir``. The log lives in
    ``checkpoint_dir`` (kept when the attempt fails: the error names it) and is copied into
    ``workdir`` when training succeeds."""
    import mlflow

    active = mlflow.active_run()
    payload = build_payload(
        cfg,
        workdir,
        checkpoint_dir,
        result_name,
        mlflow_run_id=active.info.run_id if active else None,
        **inputs,
    )
    log_path = Path(checkpoint_dir) / log_name
    launch(entry, payload, train.num_processes, log_path, stall_timeout_s=train.stall_timeout_s)
    shutil.copyfile(log_path, Path(workdir) / log_name)
    return json.loads(Path(payload["result"]).read_text())


# glibc malloc in a training process: keep freed memory for the next step instead of handing it
# back to the OS. Every step allocates the same activations again; with glibc's defaults the
# large ones are mmapped and page-faulted afresh (a 5 MB copy then took ~17 ms). Measured on the
# demo-shaped DiT step, 1 thread, in alternating runs: 4-6 % faster. RSS stays at its high-water
# mark, which a training process reaches every step anyway. An environment value set by the
# user wins.
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(256 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
    "MALLOC_TOP_PAD_": str(256 * 2**20),
}


LAUNCHERS = ("torchrun", "deepspeed")


def launch(
    entry: str,
    payload: dict[str, Any],
    num_processes: int,
    log_path: Path,
    *,
    launcher: str = "torchrun",
    stall_timeout_s: float = 1800.0,
) -> None:
    """Run ``entry`` (``"module:function"``) in ``num_processes`` DeepSpeed processes.

    The payload is written next to the log as JSON and passed to every process. Output of all
    ranks goes to ``log_path``; a non-zero exit raises :class:`TrainingFailed` with its tail.
    Workers that print nothing for ``stall_timeout_s`` (``train.stall_timeout_s``) are stopped
    (SIGTERM to the launcher, which forwards it; SIGKILL 30 s later) and the failure says they
    hung; a retry resumes from the last checkpoint.

    ``launcher``: ``torchrun`` (the default) or DeepSpeed's ``deepspeed`` launcher. Both work
    on this CPU-only machine with 1-2 gloo processes (DeepSpeed's CPU accelerator: ``deepspeed
    --num_gpus 2`` starts 2 local ranks); the workers are the same. torchrun stays the default
    for one node because the ``deepspeed`` launcher imports deepspeed twice (its runner, then
    ``deepspeed.launcher.launch``) before any worker starts: a 2-process launch took 17.5 s
    against torchrun's 4.3 s here, on every launch of every test and training step, and adds
    nothing on one node. Multi-node runs use the ``deepspeed`` launcher with a hostfile
    (infra/README.md). It needs ``--no_local_rank`` (else it prepends ``--local_rank=N`` to our
    arguments) and a free ``--master_port`` (it defaults to a fixed 29500).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    payload_path = log_path.with_suffix(".payload.json")
    payload_path.write_text(json.dumps(payload, indent=2, default=str))
    worker = ["components.core.trainer", entry, str(payload_path)]
    if launcher == "torchrun":
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", "--nnodes", "1"]
        cmd += ["--nproc-per-node", str(num_processes), "-m", *worker]
    else:
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed), "--num_nodes", "1", "--num_gpus", str(num_processes)]
        cmd += ["--master_port", str(_free_port()), "--no_local_rank", "--module", *worker]
    env = dict(os.environ)
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    for name, value in MALLOC_ENV.items():
        env.setdefault(name, value)
    # compiled kernels survive retries: always under TESSERA_HOME (inductor itself exports its
    # /tmp default into os.environ once anything in this process has compiled)
    env.update(cache_env(Environment.read().home))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        last_output = [time.monotonic()]
        stalled = threading.Event()
        watchdog = threading.Thread(
            target=_watch, args=(proc, last_output, stall_timeout_s, stalled), daemon=True
        )
        watchdog.start()
        for line in proc.stdout:  # everything to the log; progress lines also to our stdout
            last_output[0] = time.monotonic()
            log.write(line)
            log.flush()
            if line.startswith(PROGRESS_PREFIXES):
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()
        proc.wait()
        watchdog.join()
    if stalled.is_set():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise TrainingFailed(
            f"{entry} printed nothing for {stall_timeout_s:g} s (train.stall_timeout_s) on "
            f"{num_processes} process(es) and was stopped as hung (a collective waiting on a "
            f"dead rank? a stuck filesystem?); a retry resumes from its last checkpoint; full "
            f"log: {log_path}\n{tail}"
        )
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise TrainingFailed(
            f"{entry} failed with exit code {proc.returncode} on {num_processes} process(es); "
            f"full log: {log_path}\n{tail}"
        )


def _watch(
    proc: subprocess.Popen, last_output: list[float], timeout_s: float, stalled: threading.Event
) -> None:
    """Stop ``proc`` once it has been silent for ``timeout_s``; returns when it exits."""
    while proc.poll() is None:
        if time.monotonic() - last_output[0] > timeout_s:
            stalled.set()
            proc.terminate()  # torchrun / deepspeed forward SIGTERM to their workers
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            return
        time.sleep(min(1.0, timeout_s / 10))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(entry: str, payload_path: str) -> None:
    """Run ``entry`` on the payload, then leave without interpreter finalisation.

    Gloo's worker threads can still be releasing the last collective's tensors when Python
    finalises; they then need the GIL, cannot get it, and the process aborts ("terminate called
    without an active exception", SIGABRT) although training finished (pytorch/pytorch#179291;
    seen here about once in 15-30 two-process runs under load, with or without
    ``destroy_process_group``). So a worker flushes its output and ends with ``os._exit``.
    """
    import faulthandler
    import logging

    import torch.distributed as dist

    faulthandler.enable()  # a native crash (SIGSEGV, SIGABRT) prints every thread's stack to the log
    code = 0
    try:
        module_name, _, fn_name = entry.partition(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        fn(json.loads(Path(payload_path).read_text()))
        if dist.is_initialized():
            dist.barrier()  # no rank leaves while another still talks to it
    except BaseException:
        sys.excepthook(*sys.exc_info())  # torch's hook prefixes "[rankN]:" to the traceback
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------- distributed


def init_distributed(train: TrainConfig) -> None:
    """Initialise torch.distributed through DeepSpeed (also for a single process)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python`, no launcher: a world of one on loopback
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )
    if not train.cpu_shm_comm and not torch.cuda.is_available():
        # The shared-memory CPU all-reduce JIT-compiles a C++ op (minutes on a fresh machine);
        # gloo does the same job for the 1-2 CPU processes this path serves.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(Environment.read().local_rank)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", Environment.read().local_rank)
    return torch.device("cpu")


def is_rank0() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


# --------------------------------------------------------------------------- data order


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Endless, deterministic, rank-sharded index stream that can start mid-way.

    Epoch ``e`` is a permutation of ``range(n)`` seeded by ``(seed, e)``; the global stream is
    the concatenation of epochs, and rank ``r`` of ``w`` takes positions ``r, r+w, …``. The
    position (global samples consumed) is all a resume needs.
    """

    def __init__(
        self, num_items: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0
    ):
        if num_items < 1:
            raise ValueError("ResumableSampler needs at least one item")
        self.n, self.seed, self.rank, self.world_size, self.start = (
            num_items,
            seed,
            rank,
            world_size,
            start,
        )

    def _perm(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        pos = self.start + self.rank
        epoch, perm = -1, []
        while True:
            e = pos // self.n
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield perm[pos % self.n]
            pos += self.world_size

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress display
        return 2**62


# --------------------------------------------------------------------------- the trainer


class PositionedSampler(torch.utils.data.Sampler):
    """Yields ``(global position, clip index)`` from a :class:`ResumableSampler` stream: a
    dataset keyed by position draws the same random crop for a sample after a resume."""

    def __init__(self, base: Any):
        self.base = base

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first, stride = self.base.start + self.base.rank, self.base.world_size
        for k, index in enumerate(self.base):
            yield first + k * stride, index

    def __len__(self) -> int:
        return len(self.base)


def data_loader(
    dataset: Any, sampler: Any, batch_size: int, num_workers: int, seed: int, **kwargs: Any
) -> torch.utils.data.DataLoader:
    """A DataLoader that leaves the global RNG alone. Starting an iterator draws its workers' base
    seed from the loader's generator, by default the global one: a resumed run restores the RNG and
    then starts its iterator, so it drew one number the uninterrupted run had drawn at step 0, and
    every later random draw (the VAE's posterior samples) shifted by one
    (tests/faults/test_training_killed.py)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def balance_kinds(items: Sequence[T], video_share: float, kind: Callable[[T], str]) -> list[T]:
    """``items`` with every video (``kind(item) == "video"``) repeated as often as needed for
    videos to make at least ``video_share`` of the list (0: as they come): a corpus rich in cheap
    stills still trains the temporal layers on videos most of the time."""
    videos = sum(kind(item) == "video" for item in items)
    images = len(items) - videos
    if video_share <= 0 or not videos or not images:
        return list(items)
    repeat = max(1, math.ceil(video_share / (1 - video_share) * images / videos))
    return [item for item in items for _ in range(repeat if kind(item) == "video" else 1)]


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples consumed (the data position)


def lr_lambda(train: TrainConfig):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant)."""

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.schedule == "constant":
            return 1.0
        span = max(1, train.steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    return factor


def precision(train: TrainConfig) -> str:
    """``bf16`` or ``fp32``: the matmul precision of training.

    ``auto`` is bf16 on CUDA GPUs that support it, and on CPUs whose bf16 matmuls are measured to
    be at least :data:`CPU_BF16_MIN_SPEEDUP` times faster than fp32 ones.
    """
    if train.precision != "auto":
        return train.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16_speedup() >= CPU_BF16_MIN_SPEEDUP else "fp32"


def resolve_precision(cfg: TesseraConfig) -> TesseraConfig:
    """``cfg`` with the trainers' CPU ``precision: auto`` replaced by :func:`precision`.

    The launchers resolve it once (the steps' ``build_payload``), so every rank trains in the
    same precision even if their timings differ; on CUDA each worker resolves ``auto`` on its
    own device.
    """
    if torch.cuda.is_available():
        return cfg

    def resolved(section: Any) -> Any:
        if section.train.precision != "auto":
            return section
        return replace(section, train=replace(section.train, precision=precision(section.train)))

    return replace(cfg, train_vae=resolved(cfg.train_vae), train_dit=resolved(cfg.train_dit))


def bf16_weights(train: TrainConfig) -> bool:
    """Whether DeepSpeed holds bf16 weights (its bf16 optimizer keeps fp32 masters): on CUDA.

    On CPU bf16 training is autocast only: fp32 weights, gradients and optimizer, bf16 matmuls.
    """
    return precision(train) == "bf16" and torch.cuda.is_available()


def deepspeed_config(train: TrainConfig, world_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config a :class:`Trainer` initialises with: the file ``train.deepspeed``
    names (``infra/deepspeed/<name>.json`` or a path; validated by :class:`TrainConfig`) with
    its ``"auto"`` keys filled in from ``train``: micro batch, gradient accumulation, the global
    batch (``world_size`` processes; default: the initialised world), clipping and
    ``bf16.enabled`` (:func:`bf16_weights`). A file that pins ``bf16.enabled`` must agree
    with :func:`bf16_weights`: the bf16 files are for CUDA with ``precision`` bf16 or auto."""
    cfg = train.deepspeed_file()
    world_size = world()[1] if world_size is None else world_size
    cfg.update(
        train_micro_batch_size_per_gpu=train.micro_batch,
        gradient_accumulation_steps=train.grad_accum,
        train_batch_size=train.micro_batch * train.grad_accum * world_size,
        gradient_clipping=train.grad_clip,
    )
    bf16 = dict(cfg.get("bf16") or {})
    wanted = bf16_weights(train)
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = wanted
    elif bool(bf16["enabled"]) != wanted:
        where = "CUDA" if torch.cuda.is_available() else "CPU (autocast over fp32 weights)"
        raise ValueError(
            f"deepspeed={train.deepspeed!r} pins bf16.enabled={bf16['enabled']}, but precision="
            f"{train.precision} on {where} trains with {'bf16' if wanted else 'fp32'} weights: "
            'pick a file with bf16.enabled "auto" (e.g. zero2 instead of zero2-bf16) or set '
            "train.precision to match"
        )
    cfg["bf16"] = bf16
    cfg.setdefault("zero_optimization", {"stage": 0})
    return cfg


class Trainer:
    """One DeepSpeed engine plus checkpointing, EMA and rank-0 metric logging.

    Args:
        model: the ``nn.Module`` to train (already on CPU; moved by DeepSpeed).
        train: optimisation settings.
        checkpoint_dir: where ``step-XXXXXXX`` checkpoints go; survives task retries.
        mlflow_run_id: the step's MLflow run; rank 0 logs metrics into it.
    """

    def __init__(
        self,
        model: nn.Module,
        train: TrainConfig,
        checkpoint_dir: Path,
        mlflow_run_id: str | None = None,
        extra_params: list[nn.Parameter] | None = None,
    ) -> None:
        import deepspeed

        init_distributed(train)
        self.train = train
        self.checkpoint_dir = Path(checkpoint_dir)
        self.mlflow_run_id = mlflow_run_id
        self.rank, self.world_size = world()
        params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": train.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        # fused: one kernel over all parameters per step instead of ~10 elementwise passes each
        optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=train.betas, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
        self.ds_config = deepspeed_config(train, self.world_size)
        self.zero_stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.model = self.engine.module
        self.ema: dict[str, torch.Tensor] | None = None
        if train.ema_decay > 0:
            with self._gathered():
                self.ema = {
                    k: v.detach().clone().float() for k, v in self.model.state_dict().items()
                }
        self.state = TrainState()
        self._last_log = time.perf_counter()
        self._grad_norm: float | None = None

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch * self.train.grad_accum * self.world_size

    # --------------------------------------------------------------------------- stepping

    def backward_step(self, loss: torch.Tensor) -> bool:
        """Backward + (at accumulation boundaries) optimizer step; True when a step happened.

        A non-finite ``loss`` raises :class:`TrainingDiverged` before anything is applied, so the
        checkpoints stay clean and a retry with a fix resumes from the last one.
        """
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(
                f"the loss is {loss.item()} at step {self.state.step + 1} (rank {self.rank}); "
                "nothing of this step was applied. Lower train.lr or raise train.warmup_steps "
                "(under bf16 also try train.precision=fp32), then retry: it resumes from the "
                f"last checkpoint in {self.checkpoint_dir}"
            )
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self._grad_norm = self._reduced_grad_norm()
        self.engine.step()
        if boundary:
            self.state.step += 1
            self.state.samples += self.global_batch
            self._update_ema()
        return boundary

    def _gathered(self) -> contextlib.AbstractContextManager:
        """Under ZeRO-3: every parameter whole on every rank for the block (a collective: all
        ranks enter it); a no-op under stages 0-2, whose modules hold whole weights."""
        if self.zero_stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """``ema = d * ema + (1 - d) * weights`` for every float tensor, in one foreach pass.

        Under ZeRO-3 the module's parameters are partitions: they are gathered for the update
        (one all-gather of the model per optimizer step, as a forward does, and a whole fp32
        EMA on every rank; fine at the sizes that fit one device's memory whole).
        """
        if self.ema is None:
            return
        with self._gathered():
            live = self.model.state_dict()
            floats = [k for k, v in live.items() if v.dtype.is_floating_point]
            torch._foreach_lerp_(
                [self.ema[k] for k in floats],
                [live[k].detach().float() for k in floats],  # no copy for fp32 weights
                1 - self.train.ema_decay,
            )
            for k, v in live.items():
                if not v.dtype.is_floating_point:
                    self.ema[k].copy_(v)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def grad_norm(self) -> float | None:
        """Gradient norm of the last step, before clipping."""
        norm = self.engine.get_global_grad_norm()
        norm = self._grad_norm if norm is None else norm
        return float(norm) if norm is not None else None

    @torch.no_grad()
    def _reduced_grad_norm(self) -> float | None:
        # DeepSpeed's plain fp32 path (no ZeRO, no bf16) clips without keeping the norm; its
        # gradients are already all-reduced at the boundary, so the norm is the same on all ranks.
        if self.zero_stage > 0 or bf16_weights(self.train):
            return None  # ZeRO's and the bf16 optimizer's engines keep the norm themselves
        grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

    # --------------------------------------------------------------------------- logging

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log metrics to the step's MLflow run from rank 0 only."""
        if not is_rank0() or self.mlflow_run_id is None:
            return
        from mlflow.entities import Metric

        from components.core import tracking

        tracking.setup()
        import mlflow

        now = int(time.time() * 1000)
        step = self.state.step if step is None else step
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        mlflow.MlflowClient().log_batch(self.mlflow_run_id, metrics=batch)

    # --------------------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        done = [
            p
            for p in self.checkpoint_dir.glob("step-*")
            if (p / SEAL).exists() and not p.name.endswith(UNIVERSAL_SUFFIX)
        ]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, extra: dict[str, Any] | None = None) -> Path:
        """Save everything a resume needs; every rank must call this."""
        import torch.distributed as dist

        tag = f"step-{self.state.step:07d}"
        path = self.checkpoint_dir / tag
        client_state = {
            "step": self.state.step,
            "samples": self.state.samples,
            "world_size": self.world_size,  # ZeRO >= 1: the optimizer state is cut this many ways
            "zero_stage": self.zero_stage,
            **(extra or {}),
        }
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tag, client_state=client_state)
        torch.save(_rng_state(), path / f"rng_rank{self.rank}.pt")
        if self.ema is not None and self.rank == 0:
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in self.ema.items()}, str(path / "ema.safetensors")
            )
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            seal_checkpoint(path, client_state)
            for old in self.checkpoints()[: -self.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        if faults.triggered(f"train.sigkill.{self.checkpoint_dir.name}.{tag}"):
            os.kill(os.getpid(), signal.SIGKILL)  # drills: a pre-empted node, just after this
        return path

    def resume(self) -> dict[str, Any] | None:
        """Load the latest checkpoint whose seal verifies (see :func:`verify_checkpoint`), if
        any; returns its client state. A newer one that fails verification (half-written,
        corrupt, tampered with) is skipped with a warning naming it and why: DeepSpeed never
        unpickles a file the seal does not vouch for."""
        path = None
        for candidate in reversed(self.checkpoints()):
            try:
                verify_checkpoint(candidate)
            except CheckpointRefused as exc:
                print(f"warning: skipping checkpoint {candidate}: {exc}", file=sys.stderr)
                continue
            path = candidate
            break
        if path is None:
            return None
        tag, universal = self._resume_tag(path)
        if universal:  # DeepSpeed unpickles it too: only a sealed conversion of this checkpoint
            try:
                if verify_checkpoint(path.with_name(tag)).get("universal_of") != path.name:
                    raise CheckpointRefused(f"its seal does not say it converts {path.name}")
            except CheckpointRefused as exc:
                raise CheckpointRefused(
                    f"{path.with_name(tag)} is not a sealed universal copy of {path}: {exc}. "
                    f"Convert it again with `{_universal_command(path)}`"
                ) from None
        config = self.engine._config  # DeepSpeed reads the universal switch at load time
        forced = config.load_universal_checkpoint
        config.load_universal_checkpoint = universal
        try:
            _, client_state = self.engine.load_checkpoint(
                str(self.checkpoint_dir),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        finally:
            config.load_universal_checkpoint = forced
        rng_file = path / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        if self.ema is not None and (path / "ema.safetensors").exists():
            from safetensors.torch import load_file

            self.ema = load_file(str(path / "ema.safetensors"))
        self.state = TrainState(
            step=int(client_state["step"]), samples=int(client_state["samples"])
        )
        if self.rank == 0:  # a line of the task's log too (PROGRESS_PREFIXES)
            print(f"resumed from checkpoint {path} at step {self.state.step}", flush=True)
        return client_state

    def _resume_tag(self, path: Path) -> tuple[str, bool]:
        """``(DeepSpeed tag, universal?)`` to load for checkpoint ``path``; a ValueError, before
        DeepSpeed reads anything, when its partitioned optimizer state cannot be loaded here.

        Under ZeRO >= 1 every rank saved its own slice of the optimizer state: another process
        count (or stage) loads DeepSpeed's universal checkpoint, converted offline into the
        sibling ``<step>-universal`` (used when it exists and is needed; ``"checkpoint":
        {"load_universal": true}`` in the DeepSpeed file always loads it). Stage 0 checkpoints
        hold the whole optimizer state on every rank: they resume on any process count.
        """
        saved = json.loads((path / "COMPLETE").read_text())
        saved_world, saved_stage = saved.get("world_size"), saved.get("zero_stage")
        universal = path.with_name(f"{path.name}{UNIVERSAL_SUFFIX}")
        forced = bool(self.ds_config.get("checkpoint", {}).get("load_universal"))
        mismatch = (
            saved_world is not None
            and saved_stage is not None
            and (saved_stage or self.zero_stage)
            and (saved_world != self.world_size or saved_stage != self.zero_stage)
        )
        if universal.is_dir() and (forced or mismatch):
            return universal.name, True
        if forced:
            raise ValueError(
                f"checkpoint.load_universal is set in deepspeed={self.train.deepspeed!r} but "
                f"{universal} does not exist; convert {path} first:\n  " + _universal_command(path)
            )
        if mismatch:
            raise ValueError(
                f"{path} was written by {saved_world} process(es) under ZeRO stage {saved_stage}; "
                f"this run has {self.world_size} process(es) under ZeRO stage {self.zero_stage} "
                "and the ZeRO optimizer state is partitioned per rank. Resume with "
                f"train.num_processes={saved_world} and the same DeepSpeed file, or convert the "
                "checkpoint to DeepSpeed's universal format and retry (the trainer loads it, "
                'as "checkpoint": {"load_universal": true} in the DeepSpeed file would):\n  '
                + _universal_command(path)
            )
        return path.name, False

    def export_state_dict(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """Consolidated float32 weights (CPU) for the registry / serving: EMA when enabled.

        Under ZeRO-3 without EMA every rank must call it (the partitions are gathered); under
        stages 0-2 each rank's module holds the whole weights. With bf16 weights (CUDA) the
        values are the bf16 weights upcast, as the EMA tracks them.
        """
        if use_ema and self.ema is not None:
            return {k: v.clone() for k, v in self.ema.items()}
        with self._gathered():
            return {
                k: v.detach().to("cpu", torch.float32, copy=True)
                if v.dtype.is_floating_point
                else v.detach().cpu().clone()
                for k, v in self.model.state_dict().items()
            }


# --------------------------------------------------------------------------- checkpoint seals

SEAL = "COMPLETE"


class CheckpointRefused(RuntimeError):
    """A checkpoint directory that must not be loaded; the message says why."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(key: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, default=str).encode()
    return hmac.new(key.encode(), canonical, hashlib.sha256).hexdigest()


def seal_checkpoint(path: Path, client_state: dict[str, Any]) -> None:
    """Commit checkpoint ``path``: ``COMPLETE`` (written atomically, last) holds the client
    state and the sha256 of every file in the directory, signed with ``TESSERA_CHECKPOINT_KEY``
    (HMAC-SHA256) when it is set."""
    files = {
        p.relative_to(path).as_posix(): _sha256(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != SEAL
    }
    body = {**json.loads(json.dumps(client_state, default=str)), "files": files}
    key = Environment.read().checkpoint_key
    if key:
        body["hmac"] = _signature(key, body)
    tmp = path / f".{SEAL}.tmp"
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(tmp, path / SEAL)


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The seal of checkpoint ``path`` once every file DeepSpeed or the trainer would read is
    exactly the one sealed; a :class:`CheckpointRefused` otherwise. Nothing is unpickled here.

    Refused: a missing or unreadable seal (a half-written checkpoint), a file missing, changed
    or not listed (a planted ``*.pt`` is never loaded), and, when ``TESSERA_CHECKPOINT_KEY`` is
    set, a seal without a valid signature.
    """
    try:
        body = json.loads((path / SEAL).read_text())
        files = body["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointRefused(
            f"its seal {path / SEAL} is missing, half-written or from an older Tessera ({exc})"
        ) from None
    key = Environment.read().checkpoint_key
    if key:
        given = body.pop("hmac", None)
        if not given or not hmac.compare_digest(given, _signature(key, body)):
            raise CheckpointRefused(
                "its seal is not signed with this TESSERA_CHECKPOINT_KEY (written elsewhere or "
                "tampered with)"
            )
    present = {
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != SEAL
    }
    present.discard(f".{SEAL}.tmp")
    if unlisted := sorted(present - set(files)):
        raise CheckpointRefused(f"it holds files its seal does not list: {unlisted[:5]}")
    for rel, digest in sorted(files.items()):
        file = path / rel
        if not file.is_file():
            raise CheckpointRefused(f"{rel} is missing")
        if _sha256(file) != digest:
            raise CheckpointRefused(f"{rel} does not match its sealed sha256 (corrupt or replaced)")
    return body


def _universal_command(path: Path) -> str:
    return f"tessera checkpoint universal {path}"


def make_universal(path: Path, timeout_s: float = 3600.0) -> Path:
    """Convert sealed ZeRO checkpoint ``path`` with DeepSpeed's ``ds_to_universal`` into the
    sibling ``<step>-universal`` and seal that too (``tessera checkpoint universal``).

    ``ds_to_universal`` unpickles what it reads, so ``path`` is verified first; its output is
    written beside and sealed before it is moved into place, so resume (which verifies every
    directory DeepSpeed loads) never loads an unsealed or half-converted universal copy.
    """
    path = Path(path)
    body = verify_checkpoint(path)  # CheckpointRefused: nothing is unpickled
    universal = path.with_name(f"{path.name}{UNIVERSAL_SUFFIX}")
    staging = path.with_name(f".{universal.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
    command += ["--input_folder", str(path), "--output_folder", str(staging)]
    command += ["--inject_missing_state"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(
            f"ds_to_universal on {path} did not finish in {timeout_s:g} s; nothing was written"
        ) from None
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(
            f"ds_to_universal failed on {path} (exit {proc.returncode}); nothing was written:\n"
            + proc.stderr[-3000:]
        )
    state = {k: v for k, v in body.items() if k not in ("files", "hmac")}
    seal_checkpoint(staging, {**state, "universal_of": path.name})
    shutil.rmtree(universal, ignore_errors=True)
    os.replace(staging, universal)
    return universal


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(int(x) for x in state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def maybe_autocast(train: TrainConfig) -> Iterator[None]:
    """bf16 autocast on the training device when :func:`precision` says bf16."""
    if precision(train) == "bf16":
        with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
