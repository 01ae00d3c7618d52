"""A tiny regression trained by ``components.core.trainer``: the worker the trainer tests launch
(``tests.testing_utils.deepspeed:worker``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from components.core.config import TrainConfig, from_dict
from components.core.trainer import ResumableSampler, Trainer


def make_data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    return x, y


def train(payload: dict) -> list[float]:
    train_cfg = from_dict(TrainConfig, payload["train"])
    torch.manual_seed(123)
    model = torch.nn.Linear(4, 1)
    trainer = Trainer(model, train_cfg, Path(payload["checkpoint_dir"]))
    trainer.resume()
    x, y = make_data()
    sampler = iter(
        ResumableSampler(
            len(x),
            seed=0,
            rank=trainer.rank,
            world_size=trainer.world_size,
            start=trainer.state.samples,
        )
    )
    losses, grad_norms = [], []
    stop_at = payload.get("stop_at", train_cfg.steps)
    step_loss = torch.zeros(2, dtype=torch.float64)  # loss sum, micro-batches (this rank)
    while trainer.state.step < stop_at:
        idx = [next(sampler) for _ in range(train_cfg.micro_batch)]
        loss = torch.nn.functional.mse_loss(trainer.engine(x[idx]), y[idx])
        if payload.get("nan_at") == trainer.state.step + 1:  # a diverging step
            loss = loss * float("nan")
        step_loss += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        if trainer.backward_step(loss):
            if dist.is_initialized():
                dist.all_reduce(step_loss)
            losses.append(float(step_loss[0] / step_loss[1]))  # the global batch's mean loss
            step_loss.zero_()
            grad_norms.append(trainer.grad_norm())
            if trainer.state.step % train_cfg.checkpoint_every == 0:
                trainer.save_checkpoint()
    state = trainer.export_state_dict()  # every rank: ZeRO-3 gathers the partitions
    raw = trainer.export_state_dict(use_ema=False)
    if trainer.rank == 0:
        out = {
            "losses": losses,
            "weight": state["weight"].flatten().tolist(),
            "bias": state["bias"].tolist(),
            "raw_weight": raw["weight"].flatten().tolist(),
            "grad_norms": grad_norms,
            "step": trainer.state.step,
            "zero_stage": trainer.zero_stage,
            # ZeRO-3 leaves each module an empty placeholder of every partitioned parameter
            "partitioned": any(p.numel() == 0 for p in trainer.model.parameters()),
            "world_size": trainer.world_size,
        }
        Path(payload["out"]).write_text(json.dumps(out))
    return losses


def worker(payload: dict) -> None:
    train(payload)


def environment(payload: dict) -> None:
    """Write the environment variables named in ``payload["names"]`` to ``payload["out"]``."""
    import os

    Path(payload["out"]).write_text(json.dumps({n: os.environ.get(n) for n in payload["names"]}))


def hang(payload: dict) -> None:
    """A worker that stops making progress: one line, then silence (a stuck collective)."""
    import time

    print("hang: started", flush=True)
    time.sleep(3600)
