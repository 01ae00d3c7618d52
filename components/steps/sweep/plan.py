"""The sweep's plan: one training run per (variant, size, budget), sized by the analytic FLOP count.

A run's compute is ``steps x FLOPs per step``. FLOPs per step come from
:func:`model.flops.train_flops` (forward + backward of every matmul and attention product: about
6 x N per trained token for the N per-token weights, plus each clip's self-attention, quadratic
in *that clip's* tokens, and its text cross-attention and projections), averaged over the first
``sweep.plan_steps`` steps of the trainer's own pack stream (:class:`PackStream` over the
training clips' latent sizes, their caption token counts, the run's token budget). So a plan
row's steps are ``round(budget / FLOPs per step)``; when that falls below ``sweep.min_steps``
the run gets fewer tokens per step (the token budget halves, down to the largest clip) rather
than a handful of steps. The expected wall time is the planned FLOPs over the calibrated matmul
peak of this machine (``components.core.hardware.peak_gflops``) times ``sweep.expected_mfu``.

The plan is a pure function of the config and the latents, so a re-plan gives the same rows;
a row's ``key`` (variant, size, budget) names its directory, which is what makes a re-triggered
sweep skip the points already trained.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from components.core.config import ConfigError, TesseraConfig
from components.core.latents import read_index
from components.steps.train_dit.data import PackStream, split_clips
from model.dit import DiTConfig, dit_config
from model.flops import count_params, train_flops
from model.patches import clip_tokens


@dataclass(frozen=True)
class Workload:
    """What one training step packs: every training clip's latent grid and caption tokens."""

    grids: list[tuple[int, int, int]]  # (t, h, w) latent sizes, in clip order
    text_tokens: list[int]  # real caption tokens per clip (0 = no caption)
    channels: int
    text_dim: int


@dataclass(frozen=True)
class PlanRow:
    """One planned training run (XCom-sized as a dict)."""

    key: str
    size: str
    params: int
    budget: float
    steps: int
    token_budget: int  # per pack
    tokens_per_step: float  # mean real tokens a step trains on (packs are not full)
    flops_per_step: float
    planned_flops: float
    expected_s: float
    framing: str
    captions: str

    @property
    def variant(self) -> str:
        return f"{self.framing}/{self.captions}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def workload(cfg: TesseraConfig, latents: str) -> Workload:
    """The training clips of ``latents`` (as the trainer splits them) and their token counts."""
    from model.text import load_text_encoder

    index = read_index(latents)
    train, _, _ = split_clips(index, cfg.train_dit.val_clips)
    encoder = load_text_encoder(cfg.text.encoder, cfg.text.max_length)
    captions = [str(c) if isinstance(c, str) else "" for c in train["caption"]]
    flags = train["has_text"] if "has_text" in train else [True] * len(train)
    has_text = [bool(h) and bool(c.strip()) for h, c in zip(flags, captions, strict=True)]
    texts = [c for c, h in zip(captions, has_text, strict=True) if h]
    ids = encoder.tokenizer(texts, truncation=True, max_length=cfg.text.max_length)["input_ids"]
    counts = iter(len(i) for i in ids)
    grids = [
        (int(t), int(h), int(w))
        for t, h, w in zip(train["latent_t"], train["latent_h"], train["latent_w"], strict=True)
    ]
    return Workload(
        grids=grids,
        text_tokens=[next(counts) if h else 0 for h in has_text],
        channels=int(train["latent_c"].iloc[0]),
        text_dim=int(encoder.dim),
    )


def square(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The latent grid of a clip centre-cropped to a square (``framing: square_crop``)."""
    t, h, w = grid
    return t, min(h, w), min(h, w)


def model_config(cfg: TesseraConfig, size: str, work: Workload) -> DiTConfig:
    tcfg = cfg.train_dit
    return dit_config(
        size,
        in_channels=work.channels,
        text_dim=work.text_dim,
        patch_size=tuple(tcfg.patch_size),
        attention_backend=tcfg.attention_backend,
        gradient_checkpointing=tcfg.gradient_checkpointing,
    )


def step_flops(
    cfg: TesseraConfig, config: DiTConfig, work: Workload, framing: str, token_budget: int
) -> tuple[float, float]:
    """Mean training FLOPs and real tokens of one step over the first ``sweep.plan_steps`` steps
    of the pack stream the trainer will draw (same seed, same clip lengths, same budget)."""
    tcfg, train = cfg.train_dit, cfg.train_dit.train
    grids = [square(g) for g in work.grids] if framing == "square_crop" else work.grids
    lengths = [clip_tokens((work.channels, *g), tcfg.patch_size, tcfg.drop_rate) for g in grids]
    stream = PackStream(lengths, token_budget, cfg.seed)
    packs_per_step = train.micro_batch * train.grad_accum * train.num_processes
    flops = tokens = 0.0
    for _ in range(cfg.sweep.plan_steps * packs_per_step):
        pack = stream.next_pack()
        seqlens = [lengths[i] for i in pack]
        flops += train_flops(config, seqlens, [work.text_tokens[i] for i in pack])
        tokens += sum(seqlens)
    return flops / cfg.sweep.plan_steps, tokens / cfg.sweep.plan_steps


def plan_sweep(cfg: TesseraConfig, work: Workload, peak_gflops: float) -> list[PlanRow]:
    """Every (framing, captions, size, budget) of ``cfg.sweep``, each with its steps.

    Without ``sweep.budgets`` the plan is one run per size of ``train_dit.train.steps``.
    """
    scfg, tcfg, train = cfg.sweep, cfg.train_dit, cfg.train_dit.train
    sizes = list(scfg.sizes) or [tcfg.size]
    rows = []
    for framing in scfg.framings:
        grids = [square(g) for g in work.grids] if framing == "square_crop" else work.grids
        longest = max(clip_tokens((work.channels, *g), tcfg.patch_size) for g in grids)
        for captions in scfg.captions:
            for size in sizes:
                config = model_config(cfg, size, work)
                budgets = list(scfg.budgets) or [None]
                for budget in budgets:
                    token_budget = tcfg.token_budget
                    per_step, tokens = step_flops(cfg, config, work, framing, token_budget)
                    if budget is None:
                        steps = train.steps
                    else:
                        steps = round(budget / per_step)
                        while steps < scfg.min_steps and token_budget > longest:
                            token_budget = max(longest, token_budget // 2)
                            per_step, tokens = step_flops(cfg, config, work, framing, token_budget)
                            steps = round(budget / per_step)
                        if steps < scfg.min_steps:
                            raise ConfigError(
                                f"sweep budget {budget:.3g} FLOPs buys {steps} steps of {size} "
                                f"at the smallest token budget {token_budget} (the largest clip "
                                f"has {longest} tokens); sweep.min_steps is {scfg.min_steps}. "
                                f"Raise the budget to at least {scfg.min_steps * per_step:.3g} "
                                "or lower sweep.min_steps"
                            )
                    planned = steps * per_step
                    rows.append(
                        PlanRow(
                            key=row_key(framing, captions, size, budget, steps),
                            size=size,
                            params=count_params(config),
                            budget=float(budget if budget is not None else planned),
                            steps=steps,
                            token_budget=token_budget,
                            tokens_per_step=tokens,
                            flops_per_step=per_step,
                            planned_flops=planned,
                            expected_s=planned / (peak_gflops * 1e9 * scfg.expected_mfu),
                            framing=framing,
                            captions=captions,
                        )
                    )
    return rows


def row_key(framing: str, captions: str, size: str, budget: float | None, steps: int) -> str:
    """A row's path-safe identity: ``native-original-tessera-xs-6e12`` (or ``-s2000`` when the
    run is set by steps, not a budget)."""
    amount = f"{budget:.3g}".replace("+", "") if budget is not None else f"s{steps}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{framing}-{captions}-{size}-{amount}")


def point_config(cfg: TesseraConfig, row: dict[str, Any]) -> TesseraConfig:
    """The train_dit config of one plan row: its size, variant, token budget and steps; the
    learning-rate schedule ends at the row's budget; the validation loss is taken at the start
    and the end; samples only at the end (one set per point)."""
    tcfg, train = cfg.train_dit, cfg.train_dit.train
    steps = int(row["steps"])
    train = dataclasses.replace(
        train,
        steps=steps,
        warmup_steps=min(train.warmup_steps, max(1, steps // 10)),
        checkpoint_every=min(train.checkpoint_every, steps),
        log_every=min(train.log_every, max(1, steps // 10)),
    )
    tcfg = dataclasses.replace(
        tcfg,
        size=row["size"],
        token_budget=int(row["token_budget"]),
        framing=row["framing"],
        captions=row["captions"],
        eval_every=steps,
        sample_every=0,
        train=train,
    )
    return dataclasses.replace(cfg, train_dit=tcfg)


def table(rows: Sequence[PlanRow | dict[str, Any]]) -> str:
    """The plan as a Markdown table (``tessera sweep --dry-run``, MLflow)."""
    head = (
        "| key | size | params | budget (FLOPs) | steps | tokens/step | planned FLOPs | expected |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        r = r.to_dict() if isinstance(r, PlanRow) else r
        lines.append(
            f"| {r['key']} | {r['size']} | {r['params'] / 1e6:.2f} M | {r['budget']:.3g} | "
            f"{r['steps']} | {r['tokens_per_step']:.0f} | {r['planned_flops']:.3g} | "
            f"{_duration(r['expected_s'])} |"
        )
    total = sum((r.to_dict() if isinstance(r, PlanRow) else r)["expected_s"] for r in rows)
    lines.append(f"\n{len(rows)} runs, expected {_duration(total)} in all")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
