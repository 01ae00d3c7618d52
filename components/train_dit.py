"""Train the text-to-video DiT on latent shards (``tessera train-dit``; issue 5).

**Input** is the encode step's output ``latents``: ``index.parquet`` (one row per clip, see
:data:`components.encode.INDEX_SCHEMA`) and safetensors shards holding ``"{clip_id}/latent"`` (C, t, h, w) float32,
already normalised, plus ``"{clip_id}/text"`` (L, D) float32 and ``"{clip_id}/text_mask"`` (L,)
uint8 for captioned clips, and ``"{clip_id}/short_text"`` / ``short_text_mask`` where a clip has a
short caption: a ``train_dit.short_caption_rate`` share of training clips is conditioned on it
instead (validation always uses the long caption). A clip without text trains with the null
condition (all-False mask), exactly what classifier-free guidance samples with.

**Data** is held in memory by every training process: at the demo and small profiles a clip is
at most ~17 x 32 x 32 x 8 floats (~0.5 MB) and the corpus a few hundred MB at most. A corpus that
does not fit would stream shards per epoch in the clip order below (not needed yet).

**Batches** are *patch n' pack* token sequences (NaViT): images and videos of every size are
patchified at their native size and packed greedily, in the clip order of a
:class:`~components.trainer.ResumableSampler`, until the next clip would exceed
``train_dit.token_budget`` (optionally after NaViT token dropping, ``drop_rate``). That gives one
deterministic *global pack sequence*; the data position is the number of clips consumed.

**Distribution.** A step consumes ``G = micro_batch * grad_accum * num_processes`` consecutive
packs; rank ``r`` of ``w`` takes packs ``r, r + w, ...`` of them, ``micro_batch`` per forward, and
every pack draws its timesteps, noise, text dropout and token drop from a generator seeded by its
global index. The step's gradient is therefore the mean over the same ``G`` packs whatever the
split: 2 gloo processes x 1 pack equal 1 process x ``grad_accum = 2`` up to float rounding.

**Objective**: :meth:`model.diffusion.FlowMatching.training_loss` — logit-normal timesteps with
the resolution-aware shift, per-token loss averaged per clip, text dropout for CFG.

**Logging** (rank 0 → the step's MLflow run): ``loss`` and ``loss_t*`` by timestep bucket,
``tokens_per_s`` (real tokens), ``mfu`` (model FLOPs of the step from
:func:`model.dit.train_flops` / step time / measured matmul peak of this machine —
in the training precision, not a datasheet number), ``lr``, ``grad_norm``, and ``val_loss``: a
deterministic loss on fixed held-out clips with fixed timesteps and noise.

**Outputs**: DeepSpeed checkpoints (with data position and loss history) in a directory outside
the step's staging area, so a retried task resumes; ``dit/`` (``DiT.save_pretrained``, EMA weights
when enabled, + ``flow.json``) for the registry and the generator; samples at several aspect
ratios when the VAE is given.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from components import storage
from components.config import (
    TesseraConfig,
    TrainDiTConfig,
    from_dict,
    to_dict,
)
from components.encode import read_index
from components.runner import StepResult
from components.trainer import (
    ResumableSampler,
    Trainer,
    init_distributed,
    launch,
    maybe_autocast,
    precision,
    resolve_precision,
    world,
)
from model.diffusion import FlowConfig, FlowMatching
from model.dit import DiT, DiTConfig, dit_config, train_flops
from model.patches import PackedBatch, grid_shape, pack_patches, plan_packs

log = logging.getLogger(__name__)

FLOW_NAME = "flow.json"  # what model.generate.load_flow_config reads next to the DiT weights
SUMMARY_NAME = "train_dit_summary.json"
LOG_NAME = "train_dit.log"
SAMPLE_ASPECTS = ("16:9", "9:16", "1:1", "image")  # "image" = one square frame
SAMPLE_FPS = 8
DEFAULT_TEXT_DIM = 384  # only used when no clip at all has text (all-null conditioning)
_TRAIN_STREAM, _VAL_STREAM = 1, 2  # generator families: training packs, validation packs


# --------------------------------------------------------------------------------------------
# latents in memory
# --------------------------------------------------------------------------------------------


@dataclass
class LatentSet:
    """Clips held in memory, in a fixed order (sorted by clip_id).

    Attributes:
        latents: per clip (C, t, h, w) float32, normalised.
        texts: per clip (L, D) float32 text states; (1, D) zeros for a clip without text.
        text_masks: per clip (L,) bool; all False = the null condition.
        short_texts, short_masks: per clip, the short caption's states and mask, or None.
    """

    clip_ids: list[str]
    latents: list[Tensor]
    texts: list[Tensor]
    text_masks: list[Tensor]
    kinds: list[str]
    captions: list[str]
    short_texts: list[Tensor | None] = field(default_factory=list)
    short_masks: list[Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def channels(self) -> int:
        return int(self.latents[0].shape[0])

    @property
    def text_dim(self) -> int:
        return int(self.texts[0].shape[1])

    def text_batch(
        self, indices: Sequence[int], short: Sequence[bool] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Texts of clips ``indices`` padded to a common length: (B, L, D) and (B, L) bool.

        ``short[j]`` picks clip ``indices[j]``'s short caption where it has one.
        """
        chosen = [
            (self.short_texts[i], self.short_masks[i])
            if short and short[j] and self.short_texts[i] is not None
            else (self.texts[i], self.text_masks[i])
            for j, i in enumerate(indices)
        ]
        length = max(int(t.shape[0]) for t, _ in chosen)
        text = torch.zeros(len(indices), length, self.text_dim)
        mask = torch.zeros(len(indices), length, dtype=torch.bool)
        for row, (states, valid) in enumerate(chosen):
            n = states.shape[0]
            text[row, :n], mask[row, :n] = states, valid
        return text, mask


def split_clips(index: Any, val_clips: int) -> tuple[Any, Any, bool]:
    """(train rows, validation rows, held out?) of the index.

    Validation uses the first ``val_clips`` clips (by clip_id) of the ``val`` split; without a
    val split, the first ``val_clips`` training clips are held out of training — unless that
    would leave no training clip, in which case they are scored but not held out.
    """
    train = index[index["split"] == "train"]
    if train.empty:
        raise ValueError(
            f"the latents index has no split == 'train' rows (splits: "
            f"{sorted(set(index['split']))}); nothing to train on"
        )
    val = index[index["split"] == "val"].head(val_clips)
    if not val.empty or val_clips < 1:
        return train, val, True
    val = train.head(val_clips)
    if len(train) > len(val):
        return train.iloc[len(val) :], val, True
    return train, val, False


def load_latents(latents: str, rows: Any, text_dim: int | None = None) -> LatentSet:
    """Read the clips of ``rows`` (index rows) from their shards, each shard once.

    ``text_dim`` sets the width of the null text when none of these clips has text.
    """
    from safetensors.torch import load as load_safetensors

    by_id: dict[str, tuple[Tensor, Tensor | None, Tensor | None]] = {}
    shorts: dict[str, tuple[Tensor, Tensor]] = {}
    for shard, group in rows.groupby("shard", sort=True):
        uri = (
            shard
            if storage.is_s3(shard) or Path(shard).is_absolute()
            else storage.join(latents, shard)
        )
        tensors = load_safetensors(storage.read_bytes(uri))
        for clip_id in group["clip_id"]:
            key = f"{clip_id}/latent"
            if key not in tensors:
                raise KeyError(f"shard {uri} has no tensor {key!r} for a clip listed in the index")
            latent = tensors[key].float()
            if latent.ndim != 4:
                raise ValueError(f"{key} in {uri} is {tuple(latent.shape)}, expected (C, t, h, w)")
            text = tensors.get(f"{clip_id}/text")
            mask = tensors.get(f"{clip_id}/text_mask")
            if text is not None and mask is None:
                mask = torch.ones(text.shape[0], dtype=torch.bool)
            by_id[clip_id] = (latent, text, mask)
            short = tensors.get(f"{clip_id}/short_text")
            if short is not None:
                short_mask = tensors.get(f"{clip_id}/short_text_mask")
                shorts[clip_id] = (
                    short.float(),
                    torch.ones(short.shape[0], dtype=torch.bool)
                    if short_mask is None
                    else short_mask.bool(),
                )
    clip_ids = list(rows["clip_id"])
    dims = {int(t.shape[1]) for _, t, _ in by_id.values() if t is not None}
    if len(dims) > 1:
        raise ValueError(f"text states of different widths {sorted(dims)} in one latents set")
    dim = dims.pop() if dims else (text_dim or DEFAULT_TEXT_DIM)
    channels = {int(z.shape[0]) for z, _, _ in by_id.values()}
    if len(channels) > 1:
        raise ValueError(f"latents with different channel counts {sorted(channels)}")
    texts, masks = [], []
    for clip_id in clip_ids:
        _, text, mask = by_id[clip_id]
        if text is None:  # uncaptioned: the null condition
            text, mask = torch.zeros(1, dim), torch.zeros(1, dtype=torch.bool)
        texts.append(text.float())
        masks.append(mask.bool())
    captions = [str(c) if isinstance(c, str) else "" for c in rows.get("caption", [""] * len(rows))]
    kinds = [str(k) for k in rows["kind"]] if "kind" in rows else ["video"] * len(rows)
    return LatentSet(
        clip_ids,
        [by_id[c][0] for c in clip_ids],
        texts,
        masks,
        kinds,
        captions,
        [shorts.get(c, (None, None))[0] for c in clip_ids],
        [shorts.get(c, (None, None))[1] for c in clip_ids],
    )


# --------------------------------------------------------------------------------------------
# patch n' pack over a resumable clip stream
# --------------------------------------------------------------------------------------------


def clip_tokens(
    latent_shape: Sequence[int], patch_size: Sequence[int], drop_rate: float = 0.0
) -> int:
    """Tokens a clip contributes to a pack: its patch grid, minus NaViT-dropped tokens."""
    n = math.prod(grid_shape(latent_shape, patch_size))
    return max(1, round((1.0 - drop_rate) * n)) if drop_rate > 0 else n


class PackStream:
    """The global pack sequence: greedy fill to ``token_budget`` over a resumable clip order.

    Clip ``k`` of the stream is position ``k`` of ``ResumableSampler(len(lengths), seed)`` (an
    endless sequence of seeded epoch permutations). A pack takes clips in that order while they
    fit; the first clip that does not fit opens the next pack. ``position`` (clips consumed) is
    all a resume needs.
    """

    def __init__(self, lengths: Sequence[int], token_budget: int, seed: int, position: int = 0):
        too_long = [n for n in lengths if n > token_budget]
        if too_long:
            raise ValueError(
                f"{len(too_long)} clip(s) have more tokens than train_dit.token_budget="
                f"{token_budget} (largest {max(too_long)}); raise train_dit.token_budget, set "
                "train_dit.drop_rate, or encode smaller clips (encode.max_pixels / max_frames)"
            )
        self.lengths, self.token_budget, self.position = list(lengths), token_budget, position
        self._order = iter(ResumableSampler(len(self.lengths), seed, start=position))
        self._next = next(self._order)

    def next_pack(self) -> list[int]:
        """Clip indices of the next pack, in stream order."""
        pack, used = [], 0
        while not pack or used + self.lengths[self._next] <= self.token_budget:
            pack.append(self._next)
            used += self.lengths[self._next]
            self.position += 1
            self._next = next(self._order)
        return pack


def rank_packs(first_index: int, packs: Sequence[Any], rank: int, world_size: int) -> list:
    """``(global index, pack)`` of the packs rank ``rank`` trains on: ``rank, rank + w, ...``."""
    return [(first_index + k, packs[k]) for k in range(rank, len(packs), world_size)]


def pack_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """RNG of one pack: depends only on the run seed and the pack's global index."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_000_007 + index)


def make_batch(
    data: LatentSet,
    pack: Sequence[int],
    patch_size: Sequence[int],
    token_budget: int,
    drop_rate: float = 0.0,
    generator: torch.Generator | None = None,
    short_caption_rate: float = 0.0,
) -> tuple[PackedBatch, Tensor, Tensor]:
    """One packed batch of clips ``pack`` with its text rows: (batch, (B, L, D), (B, L) bool).

    With ``short_caption_rate`` > 0 each clip that has a short caption gets it instead of the
    long one with that probability (drawn from ``generator`` after the packing's draws).
    """
    batches = pack_patches(
        [data.latents[i] for i in pack],
        token_budget,
        patch_size,
        drop_rate=drop_rate,
        generator=generator,
    )
    if len(batches) != 1:
        raise RuntimeError(f"pack {list(pack)} did not fit one batch of {token_budget} tokens")
    batch = batches[0]
    indices = [pack[j] for j in batch.indices]  # text rows follow the segments
    short = None
    if (
        short_caption_rate > 0
        and data.short_texts
        and any(data.short_texts[i] is not None for i in indices)
    ):
        draws = torch.rand(len(indices), generator=generator)
        short = (draws < short_caption_rate).tolist()
    text, mask = data.text_batch(indices, short)
    return batch, text, mask


# --------------------------------------------------------------------------------------------
# model and objective
# --------------------------------------------------------------------------------------------


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
) -> float:
    """Mean per-clip flow-matching loss on ``data`` with fixed timesteps, noise and no text dropout.

    Clips are packed once (first-fit decreasing); pack ``i`` uses a generator seeded by ``(seed,
    i)``, so the value depends only on the weights. Ranks split the packs and all-reduce.
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
    for i in range(rank, len(packs), world_size):
        batch, text, mask = make_batch(data, packs[i], patch_size, max(token_budget, max(lengths)))
        out = scorer.training_loss(
            model,
            batch.to(device),
            text.to(device),
            mask.to(device),
            generator=pack_generator(seed, _VAL_STREAM, i),
        )
        total += torch.tensor([out.per_clip.double().sum().item(), out.per_clip.numel()])
    if world_size > 1 and dist.is_initialized():
        total = total.to(device)
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


# --------------------------------------------------------------------------------------------
# throughput
# --------------------------------------------------------------------------------------------


def peak_gflops(cfg: TesseraConfig, device: torch.device) -> float:
    """This process's practical matmul peak in GFLOP/s, in the training precision: the MFU
    denominator. An n×n product (n = ``bench.matmul_size`` on CPU, 4096 on GPU), measured here,
    not a datasheet number.
    """
    from components.benchmarks.calibration import torch_matmul_gflops

    dtype = torch.bfloat16 if precision(cfg.train_dit.train) == "bf16" else torch.float32
    n = 4096 if device.type == "cuda" else cfg.bench.matmul_size
    return torch_matmul_gflops(n, cfg.bench.warmup, cfg.bench.repeats, dtype, device)


def _bucket_index(t: Tensor, num_buckets: int) -> Tensor:
    return (t.detach().float().cpu() * num_buckets).long().clamp(0, num_buckets - 1)


def _bucket_names(num_buckets: int) -> list[str]:  # the names FlowMatching's LossOutput uses
    return [f"loss_t{k / num_buckets:.2f}-{(k + 1) / num_buckets:.2f}" for k in range(num_buckets)]


# --------------------------------------------------------------------------------------------
# samples (needs the VAE from train_vae and model.generate)
# --------------------------------------------------------------------------------------------


class SampleWriter:
    """Text -> video samples at several aspect ratios from the DiT being trained.

    Loads the VAE and text encoder once. Every call builds a float32 copy of the given weights on
    ``device`` and writes ``{out_dir}/{16x9,9x16,1x1,image}-{i}.{mp4,png}``.
    """

    def __init__(self, cfg: TesseraConfig, vae_dir: Path, prompts: Sequence[str], device: Any):
        from model.text import load_text_encoder
        from model.vae import CausalVAE

        self.cfg, self.prompts, self.device = cfg, list(prompts), torch.device(device)
        self.vae = CausalVAE.from_pretrained(vae_dir, device=self.device)
        self.text_encoder = load_text_encoder(cfg.text.encoder, cfg.text.max_length)

    def write(self, config: DiTConfig, state: dict[str, Tensor], out_dir: Path) -> list[Path]:
        from model.generate import VideoGenerator, save_video, video_size

        dit = DiT(config)
        dit.load_state_dict({k: v.float() for k, v in state.items()})
        tcfg, gcfg = self.cfg.train_dit, self.cfg.generate
        generator = VideoGenerator(
            self.vae, dit, self.text_encoder, FlowMatching(flow_config(tcfg)), device=self.device
        )
        written = []
        for aspect in SAMPLE_ASPECTS:
            frames, height, width = video_size(
                aspect,
                tcfg.sample_frames,
                tcfg.sample_pixels,
                generator.size_multiple,
                temporal_factor=self.vae.temporal_factor,
            )
            videos = generator.generate(
                self.prompts,
                frames,
                height,
                width,
                steps=tcfg.sample_steps,
                guidance=gcfg.guidance,
                sampler=gcfg.sampler,
                seed=gcfg.seed,
            )  # (B, 3, T, H, W)
            name = aspect.replace(":", "x")
            for i, video in enumerate(videos):
                written.append(save_video(video, out_dir / f"{name}-{i}.mp4", fps=SAMPLE_FPS))
        (out_dir / "prompts.json").write_text(json.dumps(self.prompts, indent=2))
        return written


def sample_prompts(*sets: LatentSet, count: int = 2) -> list[str]:
    """The first ``count`` captions of the given sets (validation first), or a generic prompt."""
    captions = [c for s in sets for c in s.captions if c.strip()]
    return captions[:count] or ["a short video"]


# --------------------------------------------------------------------------------------------
# the training process
# --------------------------------------------------------------------------------------------


def worker(payload: dict[str, Any]) -> None:
    """Entry point of every DeepSpeed process (``trainer.launch("components.train_dit:worker")``).

    Payload keys: ``cfg`` (the resolved config as a dict), ``latents``, ``checkpoint_dir``,
    ``out_dir`` (rank 0 writes ``dit/`` and the summary there), ``mlflow_run_id``, ``vae_dir``
    (or None), ``stop_at`` (optional: stop after this many steps, as if killed — tests).
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
    config = model_config(tcfg, data.channels, data.text_dim)
    lengths = [clip_tokens(z.shape, tcfg.patch_size, tcfg.drop_rate) for z in data.latents]
    _check_checkpoint_matches(checkpoint_dir, config)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every attempt
    trainer = Trainer(DiT(config), train, checkpoint_dir, payload.get("mlflow_run_id"))
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
    peak = peak_gflops(cfg, device) * world_size if rank == 0 else float("nan")
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
        peak = max(peak, peak_gflops(cfg, device) * world_size)
        summary = summarize(history, peak, tcfg, finished)
        summary.update(
            clips_train=len(data),
            clips_val=len(val),
            val_heldout=heldout,
            images_train=sum(k == "image" for k in data.kinds),
            packs_per_step=packs_per_step,
            precision=precision(train),
            dit_config=config.to_dict(),
        )
        Path(payload["summary"]).write_text(json.dumps(summary, indent=2, default=str))


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
    (directory / FLOW_NAME).write_text(
        json.dumps(dataclasses.asdict(flow), indent=2, sort_keys=True) + "\n"
    )
    return directory


def _check_checkpoint_matches(checkpoint_dir: Path, config: DiTConfig) -> None:
    """Refuse to resume a checkpoint of another model (clearer than a DeepSpeed shape error)."""
    done = sorted(checkpoint_dir.glob("step-*/COMPLETE"), key=lambda p: p.parent.name)
    if not done:
        return
    saved = json.loads(done[-1].read_text()).get("dit_config")
    if saved is not None and DiTConfig.from_dict(saved) != config:
        raise ValueError(
            f"{done[-1].parent} holds a checkpoint of another DiT ({saved}); this run builds "
            f"{config.to_dict()}. Delete {checkpoint_dir} or pass another checkpoint_dir"
        )


# --------------------------------------------------------------------------------------------
# the pipeline step
# --------------------------------------------------------------------------------------------


def build_payload(
    cfg: TesseraConfig,
    latents: str,
    out_dir: Path,
    checkpoint_dir: Path,
    *,
    mlflow_run_id: str | None = None,
    vae_dir: Path | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """What :func:`worker` reads (JSON), with the precision resolved (:func:`resolve_precision`)."""
    return {
        "cfg": to_dict(resolve_precision(cfg)),
        "latents": str(latents),
        "out_dir": str(out_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "summary": str(Path(out_dir) / SUMMARY_NAME),
        "mlflow_run_id": mlflow_run_id,
        "vae_dir": str(vae_dir) if vae_dir else None,
        "stop_at": stop_at,
    }


def fetch_vae(uri: str, dest: Path) -> Path:
    """A local copy of a VAE directory (``config.json`` + ``model.safetensors``) or of the
    train_vae output that holds one in ``vae/``."""
    names = ("config.json", "model.safetensors")
    for candidate in (uri, storage.join(uri, "vae")):
        if storage.exists(storage.join(candidate, names[0])):
            if not storage.is_s3(candidate):
                return storage.local_path(candidate)
            for name in names:
                storage.download_file(storage.join(candidate, name), dest / name)
            return dest
    raise FileNotFoundError(f"no VAE (config.json + model.safetensors) in {uri} or {uri}/vae")


def run(
    cfg: TesseraConfig,
    workdir: Path,
    latents: str,
    checkpoint_dir: str | Path,
    vae: str | None = None,
) -> StepResult:
    """Train the DiT on ``latents`` (the encode output) with DeepSpeed; see the module docstring.

    Args:
        latents: directory / URI with ``index.parquet`` and the safetensors shards.
        checkpoint_dir: where DeepSpeed checkpoints go, outside ``workdir`` so that a retried
            task resumes from them (:func:`components.runner.checkpoint_dir`).
        vae: the train_vae output (a VAE directory); enables samples every
            ``train_dit.sample_every`` steps and at the end. Without it no samples are made.

    Returns:
        ``files={"dit": "dit"}`` (DiT.save_pretrained + flow.json) and the run's numbers; with a
        VAE also ``vae`` (its copy) and ``model`` (the step directory: what ``tessera generate
        --model`` takes).
    """
    import mlflow

    workdir = Path(workdir)
    active = mlflow.active_run()
    ckpt = Path(checkpoint_dir)
    tmp = Path(tempfile.mkdtemp(prefix="tessera-vae-"))
    try:
        vae_dir, skipped = _samples_vae(vae, tmp)
        payload = build_payload(
            cfg,
            latents,
            workdir,
            ckpt,
            mlflow_run_id=active.info.run_id if active else None,
            vae_dir=vae_dir,
        )
        launch(
            "components.train_dit:worker",
            payload,
            cfg.train_dit.train.num_processes,
            workdir / LOG_NAME,
        )
        if vae_dir is not None:  # the DiT lives in this VAE's latent space: ship them together
            shutil.copytree(vae_dir, workdir / "vae")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = json.loads((workdir / SUMMARY_NAME).read_text())
    numbers = {
        "final_loss": summary["final_loss"],
        "val_loss": summary["val_loss"],
        "initial_val_loss": summary["initial_val_loss"],
        "tokens_per_s": summary["tokens_per_s"],
        "mfu": summary["mfu"],
        "step_time_s": summary["step_time_s"],
        "train_seconds": summary["train_seconds"],
    }
    values: dict[str, Any] = {k: v if math.isfinite(v) else None for k, v in numbers.items()}
    values.update(steps=summary["steps"], checkpoint_dir=str(ckpt))
    values["samples"] = len(summary["samples"])
    if skipped:
        values["samples_skipped"] = skipped
    if summary["sample_errors"]:
        values["samples_skipped"] = f"sampling failed: see {LOG_NAME}"
    finite = {f"train_dit.{k}": v for k, v in numbers.items() if math.isfinite(v)}
    files = {"dit": "dit"}
    if (workdir / "vae").is_dir():
        files.update(vae="vae", model="")  # the step dir is a complete model: vae/ + dit/
    return StepResult(
        files=files,
        values=values,
        metrics=finite,
        artifacts=[SUMMARY_NAME, LOG_NAME],
    )


def _samples_vae(vae: str | None, tmp: Path) -> tuple[Path | None, str | None]:
    """(local VAE dir, None), or (None, why samples are skipped)."""
    if not vae:
        return None, "no VAE given (the train_vae output enables samples)"
    import importlib.util

    missing = [m for m in ("model.generate", "model.text") if importlib.util.find_spec(m) is None]
    if missing:
        log.warning("samples skipped: %s not importable", missing)
        return None, f"{', '.join(missing)} not available"
    return fetch_vae(vae, tmp), None
