"""A tiny regression trained by ``components.core.trainer``: the worker the trainer tests launch
(``tests.testing_utils.deepspeed:worker``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
    losses = []
    stop_at = payload.get("stop_at", train_cfg.steps)
    while trainer.state.step < stop_at:
        idx = [next(sampler) for _ in range(train_cfg.micro_batch)]
        loss = torch.nn.functional.mse_loss(trainer.engine(x[idx]), y[idx])
        if payload.get("nan_at") == trainer.state.step + 1:  # a diverging step
            loss = loss * float("nan")
        if trainer.backward_step(loss):
            losses.append(loss.item())
            if trainer.state.step % train_cfg.checkpoint_every == 0:
                trainer.save_checkpoint()
    if trainer.rank == 0:
        state = trainer.export_state_dict()
        out = {
            "losses": losses,
            "weight": state["weight"].flatten().tolist(),
            "bias": state["bias"].tolist(),
            "step": trainer.state.step,
        }
        Path(payload["out"]).write_text(json.dumps(out))
    return losses


def worker(payload: dict) -> None:
    train(payload)


def environment(payload: dict) -> None:
    """Write the environment variables named in ``payload["names"]`` to ``payload["out"]``."""
    import os

    Path(payload["out"]).write_text(json.dumps({n: os.environ.get(n) for n in payload["names"]}))
