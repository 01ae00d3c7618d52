"""The captioner: a small video-to-text model (GIT / CoCa spirit) that writes a clip's caption in
two styles, and the same decoder expanding a short prompt into a descriptive caption.

**Tokens.** The real WordPiece vocabulary of all-MiniLM-L6-v2 (uncased BERT, 30,522 ids, loaded
offline as :mod:`model.text` loads it). BERT's reserved ``[unusedN]`` ids are the task tokens
that start every decoded sequence (``[unused0]`` short caption, ``[unused1]`` descriptive
caption, ``[unused2]`` prompt expansion); ``[SEP]`` ends a caption, ``[PAD]`` pads.
:class:`CaptionTokenizer` undoes WordPiece's spacing and restores sentence case, so the demo
corpus's captions round-trip exactly. A model may read and write only a *sub-vocabulary*
(``CaptionerConfig.vocab``: the ids of its training captions, :func:`build_vocab`): a full
30,522-way softmax costs ~10x the rest of the decoder on a CPU. Ids outside it read as
``[UNK]``; the model's inputs and outputs stay tokenizer ids, only ``forward``'s logits are over
the sub-vocabulary (index ``k`` is id ``vocab[k]``).

**Video encoder, on pixels** (it captions clips before any VAE exists): a clip (3, T, H, W) in
[-1, 1] of any length and aspect ratio is resized so its short side is ``short_side`` (aspect
kept), ``frames`` frames are sampled evenly (a still stays one frame), and each frame is stacked
with its difference to the previous sampled frame (an explicit motion cue; zero for a still and
the first frame). A per-frame conv trunk (stride-2 stem, one residual block per level, x2
downsampling between levels) is pooled to ``grid`` x ``grid`` cells; each cell token is its
features plus its mean input pixels (colour survives the normalisation), a learned cell
(spatial) and frame (temporal) embedding. One more token carries the clip's shape (log aspect
ratio, still or video, log length). ``encoder_layers`` transformer layers run over all (frame,
cell) tokens of a clip, so motion direction across frames is learnable.

**Prompt encoder**: the prompt's tokens through the shared token embedding, learned positions
and ``prompt_layers`` transformer layers: the memory of the ``expand`` task.

**Text decoder**: pre-norm transformer blocks (causal self-attention, cross-attention to the
memory, MLP), learned positions, the token embedding tied to the output layer; teacher-forced
cross-entropy (:func:`caption_loss`). Decoding (:func:`generate`): greedy, beam search, or
seeded sampling; a sequence's confidence is its mean token log-probability.

PyTorch only; no file I/O beyond loading the tokenizer (``Pretrained`` saves and loads).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from model.config import ModelConfig, Pretrained, SizeRegistry
from model.evaluator import fit_short_side

STYLES = ("short", "descriptive")
TASKS = (*STYLES, "expand")
TASK_TOKENS = {"short": "[unused0]", "descriptive": "[unused1]", "expand": "[unused2]"}
PAD_TOKEN, END_TOKEN, UNK_TOKEN = "[PAD]", "[SEP]", "[UNK]"
IGNORE_INDEX = -100  # targets the loss skips (padding)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CaptionerConfig(ModelConfig):
    """Every hyperparameter of :class:`Captioner`; saved as ``config.json``."""

    in_channels: int = 3
    short_side: int = 64  # working resolution: clips are resized so the short side is this
    frames: int = 8  # frames sampled evenly over a video (a still is one frame)
    widths: tuple[int, ...] = (16, 32, 64)  # conv trunk channels per level; x2 down between
    grid: int = 4  # grid x grid visual tokens per frame
    dim: int = 128  # transformer width (memory and decoder)
    heads: int = 4
    mlp_ratio: int = 4
    encoder_layers: int = 2  # over all (frame, cell) tokens of a clip
    prompt_layers: int = 1  # over a prompt's tokens (the expand task)
    decoder_layers: int = 2
    # the masked mean of the memory, projected, is added to every decoder position: a direct
    # path from the clip to the first word, which cross-attention alone learns slowly
    memory_summary: bool = True
    max_tokens: int = 128  # decoded positions: task token + caption + [SEP]
    tokenizer: str = "minilm"  # load_caption_tokenizer's name
    vocab: tuple[int, ...] = ()  # tokenizer ids the model reads and writes (empty: all of them)
    vocab_size: int = 30522  # the tokenizer's vocabulary size (ids are below it)
    unk_id: int = 100  # the tokenizer's [UNK]: what ids outside ``vocab`` read as

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "in_channels",
            "short_side",
            "frames",
            "grid",
            "dim",
            "heads",
            "mlp_ratio",
            "encoder_layers",
            "decoder_layers",
            "max_tokens",
            "vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CaptionerConfig.{name} must be a positive int, got {value!r}")
        if self.prompt_layers < 0:
            raise ValueError(
                f"CaptionerConfig.prompt_layers must be >= 0, got {self.prompt_layers}"
            )
        if not self.widths or not all(isinstance(w, int) and w >= 1 for w in self.widths):
            raise ValueError(f"CaptionerConfig.widths must be positive ints, got {self.widths!r}")
        if self.dim % self.heads:
            raise ValueError(
                f"CaptionerConfig.dim={self.dim} must be divisible by heads={self.heads}"
            )
        if self.short_side < 2 ** len(self.widths):
            raise ValueError(
                f"CaptionerConfig.short_side={self.short_side} is too small for "
                f"{len(self.widths)} levels: use at least {2 ** len(self.widths)}"
            )
        if self.max_tokens < 3:
            raise ValueError(f"CaptionerConfig.max_tokens must be >= 3, got {self.max_tokens}")
        if self.vocab and self.unk_id not in self.vocab:
            raise ValueError(f"CaptionerConfig.vocab must hold unk_id={self.unk_id}")
        bad = [i for i in self.vocab if not 0 <= i < self.vocab_size]
        if bad or len(set(self.vocab)) != len(self.vocab):
            raise ValueError(
                f"CaptionerConfig.vocab must be distinct ids below vocab_size={self.vocab_size}; "
                f"bad or repeated: {bad or 'repeats'}"
            )

    @property
    def model_vocab(self) -> int:
        """V: the width of the logits."""
        return len(self.vocab) or self.vocab_size


# --------------------------------------------------------------------------- tokenizer


class CaptionTokenizer:
    """WordPiece ids of captions, and captions back from ids, with the task tokens.

    ``encode`` gives a text's ids followed by ``[SEP]`` (at most ``max_tokens`` ids; a longer text
    is cut before its ``[SEP]``); ``decode`` stops at ``[SEP]``, skips padding and task tokens,
    joins word pieces and undoes the spaces WordPiece puts around punctuation ("16 : 9" ->
    "16:9", "medium - sized" -> "medium-sized", " ." -> "."), then capitalises sentence starts
    of text made of sentences (ending with ".", "!" or "?"); a phrase ("red ball") stays as is.
    """

    def __init__(self, name: str, backend: Any):
        self.name = name
        self.backend = backend
        self.vocab_size = int(len(backend))
        ids = backend.convert_tokens_to_ids
        self.pad_id, self.end_id, self.unk_id = ids(PAD_TOKEN), ids(END_TOKEN), ids(UNK_TOKEN)
        self.task_ids = {task: ids(token) for task, token in TASK_TOKENS.items()}
        self._skip = {self.pad_id, *self.task_ids.values()}

    def encode(self, text: str, max_tokens: int) -> list[int]:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids = self.backend(text, add_special_tokens=False)["input_ids"]
        return [*ids[: max_tokens - 1], self.end_id]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        words: list[str] = []
        for token in self.backend.convert_ids_to_tokens(ids):
            if token == END_TOKEN:
                break
            if self.backend.convert_tokens_to_ids(token) in self._skip:
                continue
            if token.startswith("##") and words:
                words[-1] += token[2:]
            else:
                words.append(token)
        return _detokenize(" ".join(words))


def _detokenize(text: str) -> str:
    """Undo WordPiece's spacing around punctuation; sentence case for sentences."""
    text = re.sub(r"(\d) ([.:,]) (\d)", r"\1\2\3", text)  # 1 . 2 -> 1.2, 16 : 9 -> 16:9
    text = re.sub(r"(\w) ([-'/]) (\w)", r"\1\2\3", text)  # medium - sized -> medium-sized
    text = re.sub(r" ([.,;:!?)])", r"\1", text)
    text = re.sub(r"\( ", "(", text).strip()
    if text.endswith((".", "!", "?")):
        text = re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
    return text


@functools.cache
def load_caption_tokenizer(name: str = "minilm") -> CaptionTokenizer:
    """The captioner's tokenizer by name: ``"minilm"`` (all-MiniLM-L6-v2's WordPiece, offline)."""
    if name != "minilm":
        raise ValueError(f"unknown caption tokenizer {name!r}; the one known is 'minilm'")
    from model.text import _load_tokenizer, _minilm_dir

    return CaptionTokenizer(name, _load_tokenizer(name, _minilm_dir()))


def build_vocab(tokenizer: CaptionTokenizer, texts: Sequence[str]) -> tuple[int, ...]:
    """The sub-vocabulary of ``texts`` (sorted ids), with padding, [UNK], [SEP] and the task
    tokens: a captioner's ``vocab`` for a corpus."""
    ids = {tokenizer.pad_id, tokenizer.unk_id, tokenizer.end_id, *tokenizer.task_ids.values()}
    for text in texts:
        ids.update(tokenizer.backend(text, add_special_tokens=False)["input_ids"])
    return tuple(sorted(ids))


# --------------------------------------------------------------------------- transformer blocks


class Attention(nn.Module):
    """Multi-head attention (self when ``context`` is None); ``mask`` (B, Lq | 1, Lk), True = see."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None):
        context = x if context is None else context
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.heads)  # (B, h, Lq, d)
        k, v = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        mask = None if mask is None else mask[:, None]  # (B, 1, Lq | 1, Lk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, Lq, d)
        return self.out(rearrange(y, "b h l d -> b l (h d)"))  # (B, Lq, D)


def _mlp(dim: int, ratio: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class EncoderBlock(nn.Module):
    """Pre-norm self-attention + MLP over memory tokens (padding masked out as keys)."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.attn = Attention(config.dim, config.heads)
        self.mlp = _mlp(config.dim, config.mlp_ratio)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask[:, None, :])  # (B, M, D)
        return x + self.mlp(self.norm2(x))  # (B, M, D)


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the memory, MLP."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(config.dim) for _ in range(3))
        self.self_attn = Attention(config.dim, config.heads)
        self.cross_attn = Attention(config.dim, config.heads)
        self.mlp = _mlp(config.dim, config.mlp_ratio)

    def forward(self, x: Tensor, causal: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.norms[0](x), mask=causal)  # (B, L, D)
        x = x + self.cross_attn(self.norms[1](x), memory, memory_mask[:, None, :])  # (B, L, D)
        return x + self.mlp(self.norms[2](x))  # (B, L, D)


# --------------------------------------------------------------------------- video encoder


def _groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of ``channels`` that is at most 8."""
    return max(g for g in range(1, 9) if channels % g == 0)


class ConvBlock(nn.Module):
    """Pre-norm residual 3x3 convolution block on frames (N, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(channels), channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C, H, W)
        return x + self.conv2(F.silu(self.norm2(h)))  # (N, C, H, W)


def sample_frames(video: Tensor, frames: int) -> Tensor:
    """(C, T, H, W) -> (C, F, H, W): ``frames`` frames evenly spaced over the clip (a clip of
    ``frames`` frames is returned as is; a still stays one frame; short clips repeat frames)."""
    t = video.shape[1]
    if t == 1 or t == frames:
        return video
    index = torch.linspace(0, t - 1, frames).round().long().to(video.device)
    return video.index_select(1, index)


def with_motion(video: Tensor) -> Tensor:
    """(B, C, F, H, W) -> (B, 2C, F, H, W): each frame and its difference to the previous one
    (zero for the first frame and for a still)."""
    diff = torch.cat([torch.zeros_like(video[:, :, :1]), video.diff(dim=2)], dim=2)
    return torch.cat([video, diff], dim=1)


class VideoEncoder(nn.Module):
    """Working-size frames (B, 3, F, h, w) -> visual tokens (B, F grid², D) with cell and frame
    embeddings added."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        widths, self.grid = config.widths, config.grid
        channels = 2 * config.in_channels  # pixels + frame difference
        self.stem = nn.Conv2d(channels, widths[0], 3, stride=2, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(
                *([nn.Conv2d(widths[i - 1], widths[i], 3, stride=2, padding=1)] if i else []),
                ConvBlock(widths[i]),
            )
            for i in range(len(widths))
        )
        self.norm = nn.GroupNorm(_groups(widths[-1]), widths[-1])
        self.proj = nn.Linear(widths[-1] + channels, config.dim)  # + each cell's mean input
        self.cell_embed = nn.Parameter(torch.zeros(config.grid**2, config.dim))
        self.frame_embed = nn.Parameter(torch.zeros(config.frames, config.dim))

    def forward(self, video: Tensor) -> Tensor:
        b, _, f, _, _ = video.shape
        x = rearrange(with_motion(video), "b c f h w -> (b f) c h w")  # (B F, 2C, h, w)
        h = self.stem(x)  # (B F, C0, h/2, w/2)
        for level in self.levels:
            h = level(h)  # (B F, Ci, ., .)
        h = F.adaptive_avg_pool2d(F.silu(self.norm(h)), self.grid)  # (B F, C, g, g)
        pixels = F.adaptive_avg_pool2d(x, self.grid)  # (B F, 2C, g, g)
        cells = rearrange(torch.cat([h, pixels], 1), "(b f) c gh gw -> b f (gh gw) c", b=b)
        tokens = self.proj(cells) + self.cell_embed + self.frame_embed[:f, None]  # (B, F, g², D)
        return rearrange(tokens, "b f n d -> b (f n) d")  # (B, F g², D)


# --------------------------------------------------------------------------- the model


class Captioner(nn.Module, Pretrained):
    """Video (or prompt) memory -> caption logits; see the module docstring.

    ``forward`` takes tokenizer ids (B, L) (ids outside ``config.vocab`` read as [UNK]) and
    returns logits (B, L, V) over the model's vocabulary: index ``k`` is ``self.vocab_ids[k]``.
    """

    config_class = CaptionerConfig

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        vocab = torch.tensor(config.vocab or range(config.vocab_size), dtype=torch.long)
        self.register_buffer("vocab_ids", vocab, persistent=False)  # (V,) model index -> id
        to_model = torch.full((config.vocab_size,), -1, dtype=torch.long)
        to_model[vocab] = torch.arange(len(vocab))
        self.register_buffer("to_model", to_model, persistent=False)  # (vocab_size,) id -> index
        self.video = VideoEncoder(config)
        self.shape_embed = nn.Linear(3, config.dim)  # log aspect, video?, log length
        self.memory_blocks = nn.ModuleList(
            EncoderBlock(config) for _ in range(config.encoder_layers)
        )
        self.memory_norm = nn.LayerNorm(config.dim)
        self.prompt_pos = nn.Parameter(torch.zeros(config.max_tokens, config.dim))
        self.prompt_blocks = nn.ModuleList(
            EncoderBlock(config) for _ in range(config.prompt_layers)
        )
        self.prompt_norm = nn.LayerNorm(config.dim)
        self.token_embed = nn.Embedding(config.model_vocab, config.dim)  # tied to the output
        self.pos_embed = nn.Parameter(torch.zeros(config.max_tokens, config.dim))
        self.summary = nn.Linear(config.dim, config.dim) if config.memory_summary else None
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.decoder_layers))
        self.norm_out = nn.LayerNorm(config.dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """GPT-2's init for the transformer (N(0, 0.02) weights and embeddings, zero biases);
        He init for the convolutions, whose signal N(0, 0.02) would shrink ~10x per layer."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for p in (self.video.cell_embed, self.video.frame_embed, self.prompt_pos, self.pos_embed):
            nn.init.normal_(p, std=0.02)

    def model_index(self, ids: Tensor) -> Tensor:
        """Tokenizer ids (any shape) -> model vocabulary indices ([UNK]'s for unknown ids)."""
        index = self.to_model[ids.clamp(0, self.config.vocab_size - 1)]
        return torch.where(index < 0, self.to_model[self.config.unk_id], index)

    # --------------------------------------------------------------------------- memories

    def encode_videos(self, videos: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Clips (3, T, H, W) in [-1, 1], any length, size and aspect -> memory (B, M, D) and
        its mask (B, M) bool (True = a token). A clip has ``F grid² + 1`` tokens: F = 1 for a
        still, ``frames`` for a video; clips of one working shape run through the trunk together."""
        cfg = self.config
        if not len(videos):
            raise ValueError("encode_videos needs at least one clip")
        groups: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
        shapes = []
        for i, clip in enumerate(videos):
            if clip.ndim != 4 or clip.shape[0] != cfg.in_channels:
                raise ValueError(
                    f"clip {i} must be ({cfg.in_channels}, T, H, W), got {tuple(clip.shape)}"
                )
            _, t, h, w = clip.shape
            shapes.append([math.log(w / h), float(t > 1), math.log(t)])
            x = fit_short_side(sample_frames(clip, cfg.frames)[None], cfg.short_side)[0]
            groups.setdefault(tuple(x.shape), []).append((i, x))
        tokens: list[Tensor] = [None] * len(videos)  # type: ignore[list-item]
        for group in groups.values():
            out = self.video(torch.stack([x for _, x in group]))  # (b, F g², D)
            for j, (i, _) in enumerate(group):
                tokens[i] = out[j]
        shape = self.shape_embed(out.new_tensor(shapes))  # (B, D)
        memory, mask = pad_tokens(
            [torch.cat([s[None], t]) for s, t in zip(shape, tokens, strict=True)]
        )
        for block in self.memory_blocks:
            memory = block(memory, mask)  # (B, M, D)
        return self.memory_norm(memory), mask

    def encode_prompts(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Prompt ids (B, P) with mask (B, P) (True = a token; at least one per row) -> memory
        (B, P, D) and the same mask, for the ``expand`` task."""
        if ids.shape[1] > self.config.max_tokens:
            raise ValueError(
                f"prompts of {ids.shape[1]} tokens exceed max_tokens={self.config.max_tokens}"
            )
        x = self.token_embed(self.model_index(ids)) + self.prompt_pos[: ids.shape[1]]  # (B, P, D)
        for block in self.prompt_blocks:
            x = block(x, mask)  # (B, P, D)
        return self.prompt_norm(x), mask

    # --------------------------------------------------------------------------- decoder

    def forward(self, tokens: Tensor, memory: Tensor, memory_mask: Tensor) -> Tensor:
        """Tokenizer ids (B, L) (a task token first) + memory (B, M, D), mask (B, M) -> next-token
        logits (B, L, V) over the model's vocabulary."""
        length = tokens.shape[1]
        if length > self.config.max_tokens:
            raise ValueError(f"{length} tokens exceed max_tokens={self.config.max_tokens}")
        x = self.token_embed(self.model_index(tokens)) + self.pos_embed[:length]  # (B, L, D)
        if self.summary is not None:
            x = x + self.summary(masked_mean(memory, memory_mask))[:, None]  # (B, L, D)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()[None]
        for block in self.blocks:
            x = block(x, causal, memory, memory_mask)  # (B, L, D)
        return self.norm_out(x) @ self.token_embed.weight.T  # (B, L, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, M, D) tokens, (B, M) mask (True = a token) -> (B, D) mean of the real tokens."""
    weights = mask.to(x.dtype)[..., None]  # (B, M, 1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, D)


def pad_tokens(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Token rows (M_i, D) -> (B, M, D) zero-padded and the (B, M) mask of real tokens."""
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), longest, rows[0].shape[1])
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
    return out, mask


# --------------------------------------------------------------------------- training


def teacher_forcing(
    tokenizer: CaptionTokenizer, tasks: Sequence[str], texts: Sequence[str], max_tokens: int
) -> tuple[Tensor, Tensor]:
    """(inputs (B, L), targets (B, L)) tokenizer ids: ``[task] caption [SEP]`` shifted by one,
    padded with [PAD] (inputs) and :data:`IGNORE_INDEX` (targets); L <= max_tokens."""
    rows = []
    for task, text in zip(tasks, texts, strict=True):
        if task not in TASKS:
            raise ValueError(f"unknown captioner task {task!r}; choose one of {TASKS}")
        rows.append([tokenizer.task_ids[task], *tokenizer.encode(text, max_tokens)])
    length = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row) - 1
        inputs[i, :n], targets[i, :n] = torch.tensor(row[:-1]), torch.tensor(row[1:])
    return inputs, targets


def caption_loss(model: Captioner, logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, L, V) against tokenizer-id targets (B, L)."""
    valid = targets != IGNORE_INDEX
    index = torch.where(valid, model.model_index(targets.clamp(min=0)), IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1).float(), index.flatten(), ignore_index=IGNORE_INDEX)


def prompt_batch(
    tokenizer: CaptionTokenizer, prompts: Sequence[str], max_tokens: int
) -> tuple[Tensor, Tensor]:
    """Prompts -> ids (B, P) padded with [PAD] and mask (B, P); each ends with [SEP]."""
    rows = [tokenizer.encode(p, max_tokens) for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
    return ids, mask


# --------------------------------------------------------------------------- decoding


@torch.no_grad()
def generate(
    model: Captioner,
    memory: Tensor,
    memory_mask: Tensor,
    start_id: int,
    end_id: int,
    *,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    generators: Sequence[torch.Generator] | None = None,
) -> list[tuple[list[int], float]]:
    """Decode one sequence per memory row: (tokenizer ids without the start token, ending with
    ``end_id`` unless cut at ``max_new_tokens``; mean token log-probability).

    ``temperature > 0`` samples (row ``i`` draws from ``generators[i]``: deterministic for a
    seed); else beam search with ``num_beams`` (1: greedy). Log-probabilities are the model's
    own (temperature 1), whatever the sampling temperature.
    """
    max_new_tokens = min(max_new_tokens, model.config.max_tokens - 1)
    if temperature > 0:
        if generators is None or len(generators) != memory.shape[0]:
            raise ValueError("sampling needs one torch.Generator per memory row")
        return _sample(
            model, memory, memory_mask, start_id, end_id, max_new_tokens, temperature, generators
        )
    return _beam_search(model, memory, memory_mask, start_id, end_id, num_beams, max_new_tokens)


def _finish(
    model: Captioner, seqs: Tensor, logps: Tensor, end_id: int
) -> list[tuple[list[int], float]]:
    """(B, N) model indices with their (B, N) log-probs -> ids up to and with the end token."""
    out = []
    for row, lp in zip(model.vocab_ids[seqs].tolist(), logps.tolist(), strict=True):
        n = row.index(end_id) + 1 if end_id in row else len(row)
        out.append((row[:n], sum(lp[:n]) / max(1, n)))
    return out


def _sample(model, memory, memory_mask, start_id, end_id, steps, temperature, generators):
    b = memory.shape[0]
    end = int(model.to_model[end_id])
    tokens = torch.full((b, 1), start_id, dtype=torch.long, device=memory.device)
    seqs = torch.zeros(b, 0, dtype=torch.long, device=memory.device)
    logps = torch.zeros(b, 0, device=memory.device)
    done = torch.zeros(b, dtype=torch.bool, device=memory.device)
    for _ in range(steps):
        logits = model(tokens, memory, memory_mask)[:, -1].float()  # (B, V)
        logp = logits.log_softmax(-1)  # (B, V)
        cdf = (logits / temperature).softmax(-1).cumsum(-1)  # (B, V)
        u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(cdf)  # (B,)
        nxt = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=cdf.shape[1] - 1)
        nxt = torch.where(done[:, None], end, nxt)  # (B, 1)
        seqs = torch.cat([seqs, nxt], 1)
        logps = torch.cat([logps, logp.gather(1, nxt)], 1)
        done |= nxt[:, 0] == end
        if done.all():
            break
        tokens = torch.cat([tokens, model.vocab_ids[nxt]], 1)  # (B, L + 1)
    return _finish(model, seqs, logps, end_id)


def _beam_search(model, memory, memory_mask, start_id, end_id, beams, steps):
    """Beam search ranked by summed log-probability; a finished beam keeps its slot and score;
    of the final beams the one with the best mean token log-probability is returned."""
    b, device = memory.shape[0], memory.device
    end = int(model.to_model[end_id])
    memory = memory.repeat_interleave(beams, 0)  # (B K, M, D)
    memory_mask = memory_mask.repeat_interleave(beams, 0)  # (B K, M)
    tokens = torch.full((b * beams, 1), start_id, dtype=torch.long, device=device)
    seqs = torch.zeros(b * beams, 0, dtype=torch.long, device=device)
    logps = torch.zeros(b * beams, 0, device=device)
    score = torch.full((b, beams), -math.inf, device=device)
    score[:, 0] = 0.0  # the beams start identical: expand only the first
    done = torch.zeros(b * beams, dtype=torch.bool, device=device)
    for _ in range(steps):
        logp = model(tokens, memory, memory_mask)[:, -1].float().log_softmax(-1)  # (B K, V)
        v = logp.shape[1]
        # a finished beam continues only with the end token, at no cost
        frozen = torch.full_like(logp, -math.inf)
        frozen[:, end] = 0.0
        step_logp = torch.where(done[:, None], frozen, logp)
        total = (score.reshape(-1, 1) + step_logp).reshape(b, beams * v)  # (B, K V)
        score, flat = total.topk(beams, dim=1)  # (B, K)
        parent = (flat // v + torch.arange(b, device=device)[:, None] * beams).reshape(-1)
        nxt = (flat % v).reshape(-1, 1)  # (B K, 1)
        token_logp = torch.where(done[parent, None], 0.0, logp[parent].gather(1, nxt))
        seqs = torch.cat([seqs[parent], nxt], 1)
        logps = torch.cat([logps[parent], token_logp], 1)
        done = done[parent] | (nxt[:, 0] == end)
        if done.all():
            break
        tokens = torch.cat([tokens[parent], model.vocab_ids[nxt]], 1)  # (B K, L + 1)
    finished = _finish(model, seqs, logps, end_id)
    return [max(finished[i * beams : (i + 1) * beams], key=lambda r: r[1]) for i in range(b)]


def caption_videos(
    model: Captioner,
    tokenizer: CaptionTokenizer,
    videos: Sequence[Tensor],
    style: str = "descriptive",
    num_beams: int = 3,
    max_new_tokens: int = 128,
) -> list[tuple[str, float]]:
    """(caption, mean token log-prob) of each clip (3, T, H, W) in [-1, 1], in ``style``
    (``short`` | ``descriptive``), by beam search (``num_beams`` 1: greedy)."""
    if style not in STYLES:
        raise ValueError(f"unknown caption style {style!r}; choose one of {STYLES}")
    device = next(model.parameters()).device
    memory, mask = model.encode_videos([v.to(device) for v in videos])
    found = generate(
        model,
        memory,
        mask,
        tokenizer.task_ids[style],
        tokenizer.end_id,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
    )
    return [(tokenizer.decode(ids), logp) for ids, logp in found]


def expand_prompts(
    model: Captioner,
    tokenizer: CaptionTokenizer,
    prompts: Sequence[str],
    *,
    seed: int,
    num_return: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 128,
) -> list[list[tuple[str, float]]]:
    """Per prompt, ``num_return`` descriptive captions sampled at ``temperature`` (text, mean
    token log-prob). A prompt's samples depend only on it and ``seed`` (each prompt draws from
    its own generator seeded with ``seed``), not on the other prompts of the call."""
    if temperature <= 0:
        raise ValueError(f"expand_prompts samples: temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    ids, mask = prompt_batch(tokenizer, prompts, model.config.max_tokens)
    memory, mask = model.encode_prompts(ids.to(device), mask.to(device))
    memory = memory.repeat_interleave(num_return, 0)  # (B R, P, D)
    mask = mask.repeat_interleave(num_return, 0)  # (B R, P)
    # sample k of every prompt draws from its own generator, seeded by (seed, k)
    generators = [
        torch.Generator().manual_seed(seed * 1_000_003 + k)
        for _ in prompts
        for k in range(num_return)
    ]
    found = generate(
        model,
        memory,
        mask,
        tokenizer.task_ids["expand"],
        tokenizer.end_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        generators=generators,
    )
    texts = [(tokenizer.decode(ids), logp) for ids, logp in found]
    return [texts[i * num_return : (i + 1) * num_return] for i in range(len(prompts))]


# --------------------------------------------------------------------------- registry

CAPTIONER_SIZES: SizeRegistry[CaptionerConfig] = SizeRegistry(
    "captioner",
    {
        # Test size: 1 layer each, width 32; for pipeline tests, not for measuring anything.
        "captioner-tiny": CaptionerConfig(
            short_side=16,
            frames=4,
            widths=(8, 16),
            grid=2,
            dim=32,
            heads=4,
            mlp_ratio=2,
            encoder_layers=1,
            prompt_layers=1,
            decoder_layers=1,
        ),
        # CPU demo size: trains in minutes on the demo corpus.
        "captioner-xs": CaptionerConfig(),
        "captioner-s": CaptionerConfig(
            short_side=96,
            frames=12,
            widths=(32, 64, 128, 256),
            grid=6,
            dim=256,
            heads=8,
            encoder_layers=4,
            prompt_layers=2,
            decoder_layers=6,
        ),
    },
)


def build_captioner(name: str, **overrides: Any) -> Captioner:
    """A fresh Captioner of a named size; ``overrides`` replace config fields."""
    return Captioner(CAPTIONER_SIZES.config(name, **overrides))
