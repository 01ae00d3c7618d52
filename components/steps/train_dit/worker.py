"""One DeepSpeed process of DiT training (``run_workers`` launches it): the training loop,
validation loss, throughput and MFU, samples during training and the exported model."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from components.core import artifacts, media
from components.core.compile import compile_regions, region_report
from components.core.config import TesseraConfig, TrainDiTConfig, from_dict
from components.core.hardware import peak_gflops
from components.core.latents import read_index
from components.core.trainer import (
    Trainer,
    init_distributed,
    maybe_autocast,
    precision,
    world,
)
from components.steps.train_dit.data import (
    LatentSet,
    PackStream,
    apply_variant,
    load_latents,
    make_batch,
    pack_generator,
    rank_packs,
    split_clips,
)
from model.diffusion import FlowConfig, FlowMatching
from model.dit import DiT, DiTConfig, dit_config
from model.flops import train_flops
from model.generate import FLOW_CONFIG_NAME
from model.patches import clip_tokens, plan_packs

log = logging.getLogger(__name__)

SUMMARY_NAME = "train_dit_summary.json"
SAMPLE_ASPECTS = ("16:9", "9:16", "1:1", "image")  # "image" = one square frame
SAMPLE_FPS = 8
_TRAIN_STREAM, _VAL_STREAM = 1, 2  # generator families: training packs, validation packs

# --------------------------------------------------------------------------- model and objective


def flow_config(cfg: TrainDiTConfig) -> FlowConfig:
    """The flow-matching schedule of a run (saved as ``flow.json`` for the generator)."""
    return FlowConfig(
        prediction=cfg.prediction,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        shift_mode=cfg.shift_mode,
        shift=cfg.shift,
        shift_base_tokens=cfg.shift_base_tokens,
        shift_max=cfg.shift_max,
        text_dropout=cfg.text_dropout,
    )


def model_config(cfg: TrainDiTConfig, in_channels: int, text_dim: int) -> DiTConfig:
    """DiT config of the named size with the data's latent channels and text width."""
    return dit_config(
        cfg.size,
        in_channels=in_channels,
        text_dim=text_dim,
        patch_size=tuple(cfg.patch_size),
        attention_backend=cfg.attention_backend,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )


@torch.no_grad()
def validation_loss(
    model: Any,
    data: LatentSet,
    flow: FlowMatching,
    patch_size: Sequence[int],
    token_budget: int,
    seed: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    timesteps: int = 8,
) -> float:
    """Mean per-clip flow-matching loss on ``data`` over a fixed timestep grid, with fixed noise
    and no text dropout: the deterministic loss the compute sweep fits its law to.

    Every clip is scored at the ``timesteps`` quantiles ``(k + 0.5) / timesteps`` of the training
    timestep distribution (logit-normal, shifted for the clip's size), so the value is a
    quadrature of the expected training loss, not one random draw per clip. Clips are packed once
    (first-fit decreasing); pack ``i`` at grid point ``k`` draws its noise from a generator seeded
    by ``(seed, i, k)``, so the value depends only on the weights. Ranks split the packs and
    all-reduce.
    """
    import torch.distributed as dist

    if len(data) == 0:
        return float("nan")
    scorer = FlowMatching(dataclasses.replace(flow.config, text_dropout=0.0))
    lengths = [clip_tokens(z.shape, patch_size) for z in data.latents]
    packs = plan_packs(lengths, max(token_budget, max(lengths)))
    was_training = getattr(model, "training", False)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    # ZeRO-3 gathers parameters in every forward (a collective): all ranks run as many forwards,
    # a rank without a pack of its own in the last round scores pack 0 and does not count it
    partitioned = getattr(model, "zero_optimization_partition_weights", lambda: False)()
    rounds = -(-len(packs) // world_size) if partitioned else None
    for i in range(rank, len(packs) if rounds is None else rounds * world_size, world_size):
        counted = i < len(packs)
        i = i if counted else 0
        batch, text, mask = make_batch(data, packs[i], patch_size, max(token_budget, max(lengths)))
        batch, text, mask = batch.to(device), text.to(device), mask.to(device)
        for k in range(timesteps):
            out = scorer.training_loss(
                model,
                batch,
                text,
                mask,
                generator=pack_generator(seed, _VAL_STREAM, i * timesteps + k),
                timestep_quantile=(k + 0.5) / timesteps,
            )
            if counted:
                total += torch.tensor([out.per_clip.double().sum().item(), out.per_clip.numel()])
    if world_size > 1 and dist.is_initialized():
        total = total.to(device)
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


# --------------------------------------------------------------------------- throughput


def _bucket_index(t: Tensor, num_buckets: int) -> Tensor:
    return (t.detach().float().cpu() * num_buckets).long().clamp(0, num_buckets - 1)


def _bucket_names(num_buckets: int) -> list[str]:  # the names FlowMatching's LossOutput uses
    return [f"loss_t{k / num_buckets:.2f}-{(k + 1) / num_buckets:.2f}" for k in range(num_buckets)]


# --------------------------------------------------------------------------- samples (needs the VAE from train_vae and model.generate)


class SampleWriter:
    """Text -> video samples at several aspect ratios from the DiT being trained.

    Loads the VAE and text encoder once. Every call builds a float32 copy of the given weights on
    ``device`` and writes ``{out_dir}/{16x9,9x16,1x1,image}-{i}.{mp4,png}``.
    """

    def __init__(self, cfg: TesseraConfig, vae_dir: Path, prompts: Sequence[str], device: Any):
        from model.vae import CausalVAE

        self.cfg, self.prompts, self.device = cfg, list(prompts), torch.device(device)
        self.vae = CausalVAE.from_pretrained(vae_dir, device=self.device)
        self.text_encoder = artifacts.load_text_encoder(cfg)

    def write(self, config: DiTConfig, state: dict[str, Tensor], out_dir: Path) -> list[Path]:
        from model.generate import VideoGenerator

        dit = DiT(config)
        dit.load_state_dict({k: v.float() for k, v in state.items()})
        tcfg, gcfg = self.cfg.train_dit, self.cfg.generate
        flow = FlowMatching(flow_config(tcfg))
        generator = VideoGenerator(
            self.vae,
            dit,
            self.text_encoder,
            flow,
            device=self.device,
            max_pixels=tcfg.sample_pixels,
        )
        written = []
        for aspect in SAMPLE_ASPECTS:
            videos = generator.generate(
                self.prompts,
                *generator.video_size(aspect, tcfg.sample_frames),
                steps=tcfg.sample_steps,
                guidance=gcfg.guidance,
                sampler=gcfg.sampler,
                seed=gcfg.seed,
            )  # (B, 3, T, H, W)
            name = aspect.replace(":", "x")
            for i, video in enumerate(videos):
                written.append(media.save_video(video, out_dir / f"{name}-{i}.mp4", SAMPLE_FPS))
        (out_dir / "prompts.json").write_text(json.dumps(self.prompts, indent=2))
        return written


def sample_prompts(*sets: LatentSet, count: int = 2) -> list[str]:
    """The first ``count`` captions of the given sets (validation first), or a generic prompt."""
    captions = [c for s in sets for c in s.captions if c.strip()]
    return captions[:count] or ["a short video"]


# --------------------------------------------------------------------------- the training process


def worker(payload: dict[str, Any]) -> None:
    """Entry point of every DeepSpeed process (``trainer.run_workers`` launches it).

    Payload keys (:func:`components.core.trainer.build_payload`): ``cfg``, ``latents``,
    ``checkpoint_dir``, ``out_dir`` (rank 0 writes ``dit/`` there), ``result`` (the summary),
    ``mlflow_run_id``, ``vae_dir`` (or None), ``stop_at`` (optional: stop after this many
    steps, as if killed — tests).
    """
    cfg = from_dict(TesseraConfig, payload["cfg"])  # precision resolved by build_payload
    tcfg, train = cfg.train_dit, cfg.train_dit.train
    init_distributed(train)
    rank, world_size = world()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"train_dit: %(asctime)s [rank {rank}] %(message)s",  # launch() echoes these
    )
    out_dir, checkpoint_dir = Path(payload["out_dir"]), Path(payload["checkpoint_dir"])

    index = read_index(payload["latents"])
    train_rows, val_rows, heldout = split_clips(index, tcfg.val_clips)
    data = load_latents(payload["latents"], train_rows)
    val = load_latents(payload["latents"], val_rows, text_dim=data.text_dim)
    data = apply_variant(data, tcfg.framing, tcfg.captions)  # validation stays native
    config = model_config(tcfg, data.channels, data.text_dim)
    lengths = [clip_tokens(z.shape, tcfg.patch_size, tcfg.drop_rate) for z in data.latents]
    _check_checkpoint_matches(checkpoint_dir, config)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every attempt
    trainer = Trainer(DiT(config), train, checkpoint_dir, payload.get("mlflow_run_id"))
    compiled = compile_regions(trainer.model, train.compile, trainer.device)
    log.info("compile: %s", compiled["reason"])
    state = trainer.resume() or {}
    history: dict[str, Any] = state.get("history") or {"steps": [], "val": []}
    if state:
        log.info(
            "resumed from step %d (clip position %d)",
            trainer.state.step,
            state.get("clip_position", 0),
        )
    stream = PackStream(lengths, tcfg.token_budget, cfg.seed, int(state.get("clip_position", 0)))
    flow = FlowMatching(flow_config(tcfg))
    device = trainer.device
    packs_per_step = train.micro_batch * train.grad_accum * world_size
    peak = (
        peak_gflops(cfg.bench, precision(train), device) * world_size if rank == 0 else float("nan")
    )
    buckets = _bucket_names(flow.config.loss_buckets)
    sampler = _make_sample_writer(cfg, payload, val, data, device) if rank == 0 else None
    log.info(
        "%d train clips (%d images), %d val clips (held out: %s), %s, %d packs/step, %s, "
        "peak %.1f GFLOP/s",
        len(data),
        sum(k == "image" for k in data.kinds),
        len(val),
        heldout,
        tcfg.size,
        packs_per_step,
        precision(train),
        peak,
    )

    def evaluate() -> None:
        with maybe_autocast(train):
            value = validation_loss(
                trainer.engine,
                val,
                flow,
                tcfg.patch_size,
                tcfg.token_budget,
                cfg.seed,
                device,
                rank,
                world_size,
                tcfg.val_timesteps,
            )
        history["val"].append([trainer.state.step, value])
        trainer.log({"val_loss": value})
        log.info("step %d val_loss %.5f", trainer.state.step, value)

    def sample(tag: str) -> None:
        weights = trainer.export_state_dict(use_ema=True)  # every rank (ZeRO-3 gathers)
        if sampler is None:
            return
        target = out_dir / "samples" / tag
        try:
            paths = sampler.write(config, weights, target)
        except Exception:  # a sampling bug must not cost the training run
            history.setdefault("sample_errors", []).append(traceback.format_exc(limit=5))
            log.exception("sampling at %s failed; training goes on", tag)
            return
        history.setdefault("samples", []).extend(str(p.relative_to(out_dir)) for p in paths)
        if trainer.mlflow_run_id:
            import mlflow

            mlflow.MlflowClient().log_artifacts(
                trainer.mlflow_run_id, str(target), f"samples/{tag}"
            )

    def checkpoint() -> None:
        history["train_seconds"] = (
            history.get("train_seconds", 0.0) + time.perf_counter() - began[0]
        )
        began[0] = time.perf_counter()
        trainer.save_checkpoint(
            extra={
                "clip_position": stream.position,
                "history": history,
                "dit_config": config.to_dict(),
            }
        )

    began = [time.perf_counter()]
    stop_at = min(int(payload.get("stop_at") or train.steps), train.steps)
    if trainer.state.step == 0 and tcfg.eval_every > 0 and len(val):
        evaluate()  # the loss of the initial weights: the reference for the drop
    pending: list[dict[str, float]] = []
    while trainer.state.step < stop_at:
        record = train_step(trainer, stream, data, flow, cfg, config, buckets)
        step = trainer.state.step
        history["steps"].append(record)
        pending.append(record)
        if step % train.log_every == 0 or step == train.steps:
            trainer.log(_interval_metrics(pending, peak, buckets))
            log.info("step %d loss %.5f", step, record["loss"])
            pending = []
        if (
            tcfg.eval_every > 0
            and len(val)
            and (step % tcfg.eval_every == 0 or step == train.steps)
        ):
            evaluate()
        if tcfg.sample_every > 0 and step % tcfg.sample_every == 0 and step < train.steps:
            sample(f"step-{step:07d}")
        if step % train.checkpoint_every == 0 or step == train.steps:
            checkpoint()
    history["train_seconds"] = history.get("train_seconds", 0.0) + time.perf_counter() - began[0]
    finished = trainer.state.step >= train.steps
    if finished:
        sample("final")
        weights = trainer.export_state_dict(use_ema=True)
        if rank == 0:
            export_model(config, weights, flow.config, out_dir / "dit")
    if rank == 0:
        # a neighbour busy while the start-up peak was measured would push MFU past 1: the run's
        # MFU uses the higher of the peaks measured at start and end
        peak = max(peak, peak_gflops(cfg.bench, precision(train), device) * world_size)
        summary = summarize(history, peak, tcfg, finished)
        summary.update(
            clips_train=len(data),
            clips_val=len(val),
            val_heldout=heldout,
            images_train=sum(k == "image" for k in data.kinds),
            packs_per_step=packs_per_step,
            precision=precision(train),
            dit_config=config.to_dict(),
            compile=region_report(compiled),
        )
        Path(payload["result"]).write_text(json.dumps(summary, indent=2, default=str))


def train_step(
    trainer: Any,
    stream: PackStream,
    data: LatentSet,
    flow: FlowMatching,
    cfg: TesseraConfig,
    config: DiTConfig,
    buckets: list[str],
) -> dict[str, Any]:
    """One optimizer step over the next ``G`` packs of the global sequence (this rank's share).

    Returns the step's record, reduced over ranks: mean pack loss, real tokens, model FLOPs,
    seconds, lr, grad norm, token fill and the mean per-clip loss in each timestep bucket.
    """
    tcfg, train = cfg.train_dit, cfg.train_dit.train
    rank, world_size = trainer.rank, trainer.world_size
    mb, device = train.micro_batch, trainer.device
    start, lr = time.perf_counter(), trainer.lr()
    packs = [stream.next_pack() for _ in range(mb * train.grad_accum * world_size)]
    mine = rank_packs(trainer.state.step * len(packs), packs, rank, world_size)
    # loss sum, packs, real tokens, model FLOPs, then per-bucket loss sums and clip counts
    stats = torch.zeros(4 + 2 * len(buckets), dtype=torch.float64)
    bucket_sums, bucket_counts = stats[4:].view(2, -1)
    for a in range(train.grad_accum):
        losses = []
        for global_index, pack in mine[a * mb : (a + 1) * mb]:
            generator = pack_generator(cfg.seed, _TRAIN_STREAM, global_index)
            batch, text, mask = make_batch(
                data,
                pack,
                tcfg.patch_size,
                tcfg.token_budget,
                tcfg.drop_rate,
                generator,
                tcfg.short_caption_rate,
            )
            with maybe_autocast(train):
                out = flow.training_loss(
                    trainer.engine,
                    batch.to(device),
                    text.to(device),
                    mask.to(device),
                    generator=generator,
                )
            losses.append(out.loss)
            text_lens = (mask.sum(1) * ~out.dropped_text.cpu()).tolist()  # after text dropout
            stats[:4] += torch.tensor(
                [
                    out.loss.item(),
                    1,
                    batch.num_tokens,
                    train_flops(config, batch.seqlens, text_lens),
                ]
            )
            bucket = _bucket_index(out.t, len(buckets))
            bucket_sums.index_add_(0, bucket, out.per_clip.double().cpu())
            bucket_counts.index_add_(0, bucket, torch.ones(len(bucket), dtype=torch.float64))
        trainer.backward_step(torch.stack(losses).mean())
    stats = _all_reduce(stats, device, world_size)
    loss_sum, num_packs, tokens, flops = stats[:4].tolist()
    record = {
        "step": trainer.state.step,
        "loss": loss_sum / num_packs,
        "tokens": tokens,
        "flops": flops,
        "seconds": time.perf_counter() - start,
        "lr": lr,
        "grad_norm": trainer.grad_norm(),
        "token_fill": tokens / (num_packs * tcfg.token_budget),
    }
    sums, counts = stats[4:].view(2, -1).tolist()
    record.update({n: s / c for n, s, c in zip(buckets, sums, counts, strict=True) if c})
    return record


def _make_sample_writer(
    cfg: TesseraConfig, payload: dict[str, Any], val: LatentSet, data: LatentSet, device: Any
) -> SampleWriter | None:
    if not payload.get("vae_dir"):
        return None
    return SampleWriter(cfg, Path(payload["vae_dir"]), sample_prompts(val, data), device)


def _all_reduce(stats: Tensor, device: torch.device, world_size: int) -> Tensor:
    if world_size == 1:
        return stats
    import torch.distributed as dist

    stats = stats.to(device)
    dist.all_reduce(stats)
    return stats.cpu()


def _interval_metrics(records: list[dict[str, Any]], peak: float, buckets: list[str]) -> dict:
    """MLflow metrics of the steps since the last log: means, throughput over their time."""
    seconds = sum(r["seconds"] for r in records)
    out = {
        "loss": sum(r["loss"] for r in records) / len(records),
        "tokens_per_s": sum(r["tokens"] for r in records) / seconds,
        "mfu": sum(r["flops"] for r in records) / seconds / (peak * 1e9),
        "step_time_s": seconds / len(records),
        "token_fill": sum(r["token_fill"] for r in records) / len(records),
        "lr": records[-1]["lr"],
        "grad_norm": records[-1]["grad_norm"],
    }
    for name in buckets:
        values = [r[name] for r in records if name in r]
        if values:
            out[name] = sum(values) / len(values)
    return out


def summarize(
    history: dict[str, Any], peak: float, cfg: TrainDiTConfig, finished: bool
) -> dict[str, Any]:
    """Numbers of a whole run from its per-step history (all attempts).

    ``final_loss`` is the mean training loss of the last ``min(10, steps)`` steps; throughput is
    measured over every step but the first of the run (start-up).
    """
    steps = history["steps"]
    timed = steps[1:] or steps
    seconds = sum(r["seconds"] for r in timed) or float("nan")
    tail = steps[-10:]
    val = history["val"]
    return {
        "finished": finished,
        "steps": steps[-1]["step"] if steps else 0,
        "losses": [r["loss"] for r in steps],
        "grad_norms": [r["grad_norm"] for r in steps],
        "lrs": [r["lr"] for r in steps],
        "val": val,
        "final_loss": sum(r["loss"] for r in tail) / len(tail) if tail else float("nan"),
        "val_loss": val[-1][1] if val else float("nan"),
        "initial_val_loss": val[0][1] if val and val[0][0] == 0 else float("nan"),
        "train_flops": sum(r["flops"] for r in steps),  # counted over what every step ran
        "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
        "mfu": sum(r["flops"] for r in timed) / seconds / (peak * 1e9),
        "step_time_s": seconds / max(1, len(timed)),
        "token_fill": sum(r["token_fill"] for r in steps) / max(1, len(steps)),
        "peak_gflops": peak,
        "train_seconds": history.get("train_seconds", 0.0),
        "samples": history.get("samples", []),
        "sample_errors": history.get("sample_errors", []),
        "token_budget": cfg.token_budget,
    }


def export_model(
    config: DiTConfig, state: dict[str, Tensor], flow: FlowConfig, directory: Path
) -> Path:
    """``DiT.save_pretrained`` of consolidated float32 weights + ``flow.json`` next to them."""
    model = DiT(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.save_pretrained(directory)
    flow.to_json(directory / FLOW_CONFIG_NAME)
    return directory


def _check_checkpoint_matches(checkpoint_dir: Path, config: DiTConfig) -> None:
    """Refuse to resume a checkpoint of another model (clearer than a DeepSpeed shape error)."""
    done = sorted(checkpoint_dir.glob("step-*/COMPLETE"), key=lambda p: p.parent.name)
    if not done:
        return
    try:
        saved = json.loads(done[-1].read_text()).get("dit_config")
    except ValueError:  # a damaged seal: the trainer skips that checkpoint when it resumes
        return
    if saved is not None and DiTConfig.from_dict(saved) != config:
        raise ValueError(
            f"{done[-1].parent} holds a checkpoint of another DiT ({saved}); this run builds "
            f"{config.to_dict()}. Delete {checkpoint_dir} or pass another checkpoint_dir"
        )
