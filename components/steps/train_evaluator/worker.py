"""One DeepSpeed process of evaluator training (``run_workers`` launches it): the contrastive
loop, held-out loss and retrieval while it trains, and rank 0's saved model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.core import trainer as tr
from components.core.config import TesseraConfig, TrainEvaluatorConfig, from_dict
from components.steps.train_evaluator.data import (
    ViewDataset,
    collate,
    load_states,
    read_items,
    read_view,
    select,
)
from model.evaluator import EVALUATOR_SIZES, VideoTextModel

EVALUATOR_DIR = "evaluator"
RESULT_NAME = "train_result.json"
HISTORY_NAME = "history.json"
LOG_NAME = "train_evaluator.log"


def model_config(cfg: TesseraConfig, text_dim: int) -> Any:
    te = cfg.train_evaluator
    return EVALUATOR_SIZES.config(
        te.size,
        short_side=te.short_side,
        feature_dim=te.feature_dim,
        embed_dim=te.embed_dim,
        text_dim=text_dim,
        text_encoder=cfg.text.encoder,
        text_max_length=cfg.text.max_length,
    )


@torch.no_grad()
def held_out(
    model: VideoTextModel, videos: list[torch.Tensor], texts: torch.Tensor
) -> dict[str, float]:
    """Contrastive loss and text->video R@1 / R@5 of matching (video, pooled text) pairs."""
    was_training = model.training
    model.eval()
    v = model.encode_video(videos)
    t = model.encode_text(texts[:, None], torch.ones(len(texts), 1, dtype=torch.bool))
    logits = model.logits(v, t)  # (N videos, N texts)
    labels = torch.arange(len(videos))
    loss = (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    ranks = (logits.T > logits.diagonal()[:, None]).sum(1)  # per text: videos scored above its own
    model.train(was_training)
    return {
        "val_loss": loss.item(),
        "val_r1": (ranks < 1).float().mean().item(),
        "val_r5": (ranks < 5).float().mean().item(),
    }


def worker(payload: dict[str, Any]) -> None:
    """One DeepSpeed process of evaluator training; payload from ``trainer.build_payload``."""
    cfg = from_dict(TesseraConfig, payload["cfg"])
    te: TrainEvaluatorConfig = cfg.train_evaluator
    train = te.train
    out_dir = Path(payload["out_dir"])
    states = load_states(Path(payload["text_states"]))
    if states is None:
        raise FileNotFoundError(f"no caption states at {payload['text_states']}")
    text_dim = int(next(iter(states.values())).shape[0])
    torch.manual_seed(cfg.seed)
    model = VideoTextModel(model_config(cfg, text_dim))
    trainer = tr.Trainer(
        model, train, Path(payload["checkpoint_dir"]), payload.get("mlflow_run_id")
    )
    device, rank0 = trainer.device, trainer.rank == 0
    client_state = trainer.resume() or {}

    picked = select(read_items(payload["manifest"]), te)
    dataset = ViewDataset(
        tr.balance_kinds(picked["train"], te.video_share, lambda i: i.clip.kind),
        states,
        te,
        cfg.seed,
    )
    sampler = tr.PositionedSampler(
        tr.ResumableSampler(
            len(dataset),
            seed=cfg.seed,
            rank=trainer.rank,
            world_size=trainer.world_size,
            start=trainer.state.samples,
        )
    )
    loader = tr.data_loader(
        dataset, sampler, train.micro_batch, train.num_workers, cfg.seed, collate_fn=collate
    )
    val_items = [i for i in picked["val"] if i.captioned] if rank0 else []
    val_videos = [
        torch.from_numpy(read_view(i.clip, te.max_frames))
        .float()
        .div(127.5)
        .sub(1)
        .permute(3, 0, 1, 2)
        for i in val_items
    ]
    val_texts = torch.stack([states[i.caption] for i in val_items]) if val_items else None

    stop_at = min(int(payload.get("stop_at") or train.steps), train.steps)
    log_every, eval_every = max(1, train.log_every), max(1, te.eval_every)
    history: list[dict[str, Any]] = []
    initial_loss = client_state.get("initial_loss")
    last: dict[str, float] = client_state.get("last") or {}
    sums, count = 0.0, 0
    window_start, window_steps, train_time = time.perf_counter(), 0, 0.0
    batches = iter(loader)
    saved_at = trainer.state.step if client_state else -1
    while trainer.state.step < stop_at:
        batch = next(batches)
        videos = [v.to(device) for v in batch["videos"]]
        with tr.maybe_autocast(train):
            loss = trainer.engine(videos, batch["tokens"].to(device), batch["mask"].to(device))
        loss = loss.float()
        if not trainer.backward_step(loss):
            continue
        step = trainer.state.step
        sums, count = sums + loss.item(), count + 1
        window_steps += 1
        history.append({"step": step, "loss": loss.item(), "positions": batch["positions"]})
        if step % log_every == 0 or step == stop_at:
            elapsed = time.perf_counter() - window_start
            train_time += elapsed
            mean = _mean_over_ranks(sums, count)
            sums, count = 0.0, 0
            if initial_loss is None:
                initial_loss = mean
            samples = window_steps * trainer.global_batch
            last = {
                "loss": mean,
                "lr": trainer.lr(),
                "grad_norm": trainer.grad_norm(),
                "temperature": 1.0 / trainer.model.scale().item(),
                "samples_per_s": samples / elapsed,
                "step_time_s": elapsed / window_steps,
            }
            trainer.log({"train/loss" if k == "loss" else k: v for k, v in last.items()})
            if rank0:
                print(
                    f"train_evaluator: step {step}/{train.steps} loss {mean:.4f} "
                    f"T {last['temperature']:.4f} {last['samples_per_s']:.1f} samples/s",
                    flush=True,
                )
            window_start, window_steps = time.perf_counter(), 0
        paused = time.perf_counter()  # evaluation and checkpoints are not training throughput
        if rank0 and val_texts is not None and (step % eval_every == 0 or step == train.steps):
            scores = held_out(
                trainer.model, [v.to(device) for v in val_videos], val_texts.to(device)
            )
            trainer.log(scores)
            last.update(scores)
            print(
                f"train_evaluator: step {step} held-out loss {scores['val_loss']:.4f} "
                f"R@1 {scores['val_r1']:.3f} R@5 {scores['val_r5']:.3f} "
                f"({len(val_items)} clips, chance R@1 {1 / len(val_items):.3f})",
                flush=True,
            )
        if step % train.checkpoint_every == 0 or step == stop_at:
            trainer.save_checkpoint({"initial_loss": initial_loss, "last": last})
            saved_at = step
        window_start += time.perf_counter() - paused
    if saved_at != trainer.state.step:  # nothing ran since the last checkpoint
        trainer.save_checkpoint({"initial_loss": initial_loss, "last": last})
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / HISTORY_NAME).write_text(json.dumps(history))
    if trainer.state.step < train.steps or not rank0:
        return  # stopped early on purpose (stop_at), or not the rank that writes outputs
    final = VideoTextModel(trainer.model.config)
    final.load_state_dict(trainer.export_state_dict(use_ema=True))
    final.to(device).eval()
    # The FVD features' block scales, from training clips as the scorer reads them (first
    # max_frames frames, native size): every training video and as many stills.
    videos = [i for i in picked["train"] if i.clip.kind == "video"]
    stills = [i for i in picked["train"] if i.clip.kind != "video"]
    fit_items = (
        videos[: te.scale_clips // 2]
        + stills[: te.scale_clips - min(len(videos), te.scale_clips // 2)]
    )
    scales = final.fit_feature_scales(
        [_tensor(read_view(i.clip, te.max_frames)).to(device) for i in fit_items]
    )
    final.cpu().save_pretrained(out_dir / EVALUATOR_DIR)
    result = {
        "steps": trainer.state.step,
        "initial_loss": initial_loss,
        "final_loss": last.get("loss"),
        "temperature": 1.0 / final.scale().item(),
        "samples_per_s": last.get("samples_per_s"),
        "step_time_s": last.get("step_time_s"),
        "loop_seconds": train_time,
        "precision": tr.precision(train),
        "parameters": final.num_parameters(),
        "feature_scales": scales,
        "scale_clips": len(fit_items),
        "train_clips": len(picked["train"]),
        "train_videos": sum(i.clip.kind == "video" for i in picked["train"]),
        **{k: last[k] for k in ("val_loss", "val_r1", "val_r5") if k in last},
    }
    Path(payload["result"]).write_text(json.dumps(result, indent=2, default=_json_number))


def _tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (3, T, H, W) float32 in [-1, 1] (as the scorer converts)."""
    return torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)


def _mean_over_ranks(total: float, count: int) -> float:
    import torch.distributed as dist

    pair = torch.tensor([total, float(count)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(pair)
    return (pair[0] / pair[1].clamp(min=1)).item()


def _json_number(value: Any) -> Any:
    return float(value) if isinstance(value, (np.floating, torch.Tensor)) else str(value)
