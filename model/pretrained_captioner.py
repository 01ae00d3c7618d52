"""A pretrained vision-language captioner from Hugging Face transformers, for real deployments.

The pipeline trains its own captioner (:mod:`model.captioner`); a team with a real one (BLIP, GIT,
a ``VisionEncoderDecoderModel``) points ``caption`` at its directory instead. Loaded only from a
local directory written by ``save_pretrained`` (model + image processor + tokenizer); nothing is
downloaded (``local_files_only``). ``s3://`` directories are fetched by the caller
(:func:`components.core.artifacts.local_tree`).

An image model sees one frame of a clip: the middle one (a still is its only frame). The two
styles are the same model with different prompts and lengths: ``short`` decodes at most
``SHORT_TOKENS`` tokens; ``descriptive`` up to ``max_new_tokens``, after ``descriptive_prompt``
where the model takes a text prompt (BLIP, GIT). Confidence is the mean log-probability of the
generated tokens, as for the pipeline's own captioner.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SHORT_TOKENS = 12
EXPECTED = (
    "config.json, the weights (model.safetensors), preprocessor_config.json and the tokenizer "
    "files, as save_pretrained writes them (model and processor)"
)


@dataclass(frozen=True)
class PretrainedCaptionerConfig:
    """What the caption step reads of a captioner's config."""

    model_type: str
    short_side: int  # frames are decoded at this short side before the processor resizes


def is_pretrained_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a transformers model (its ``config.json`` names a
    ``model_type``), not a :class:`model.captioner.Captioner`."""
    path = Path(directory) / "config.json"
    return path.is_file() and "model_type" in json.loads(path.read_text())


class PretrainedCaptioner:
    """A transformers image-to-text model and its processor (see the module docstring)."""

    def __init__(self, model: Any, processor: Any, tokenizer: Any, descriptive_prompt: str = ""):
        self.model, self.processor, self.tokenizer = model.eval(), processor, tokenizer
        self.descriptive_prompt = descriptive_prompt
        size = getattr(processor, "size", None) or {}
        side = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
        self.config = PretrainedCaptionerConfig(model.config.model_type, int(side))

    @classmethod
    def from_dir(
        cls, directory: str | Path, descriptive_prompt: str = "", device: Any = "cpu"
    ) -> PretrainedCaptioner:
        """Load model, image processor and tokenizer from a local ``save_pretrained`` dir."""
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(directory)
        if not is_pretrained_dir(path):
            raise FileNotFoundError(f"no transformers captioner in {path}: expected {EXPECTED}")
        try:
            model = _model_class(path).from_pretrained(path, local_files_only=True)
            # The PIL backend: torchvision is not part of this environment (excludes.txt), and
            # transformers picks its torchvision backend whenever an import of it resolves.
            processor = AutoImageProcessor.from_pretrained(
                path, local_files_only=True, backend="pil"
            )
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # safetensors', torch's and transformers' errors share no base
            raise ValueError(
                f"cannot load the transformers captioner in {path} ({type(e).__name__}: "
                f"{str(e)[:300]}); expected {EXPECTED}"
            ) from e
        return cls(model.to(device), processor, tokenizer, descriptive_prompt)

    @torch.inference_mode()
    def caption(
        self,
        videos: Sequence[Tensor],
        style: str = "descriptive",
        num_beams: int = 3,
        max_new_tokens: int = 128,
    ) -> list[tuple[str, float]]:
        """Clips (3, T, H, W) in [-1, 1] -> (caption, mean token log-prob) each."""
        if style not in ("short", "descriptive"):
            raise ValueError(f"unknown caption style {style!r}; choose short or descriptive")
        frames = [
            ((v[:, v.shape[1] // 2].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte()
            for v in videos
        ]  # (H, W, 3) uint8: the middle frame
        inputs = self.processor(images=[f.numpy() for f in frames], return_tensors="pt")
        device = next(self.model.parameters()).device
        kwargs = {k: v.to(device) for k, v in inputs.items()}
        prompt = self.descriptive_prompt if style == "descriptive" else ""
        if prompt and "input_ids" in self.model.forward.__code__.co_varnames:
            ids = self.tokenizer([prompt] * len(frames), return_tensors="pt").input_ids
            kwargs["input_ids"] = ids.to(device)
        out = self.model.generate(
            **kwargs,
            num_beams=num_beams,
            max_new_tokens=SHORT_TOKENS if style == "short" else max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        scores = self.model.compute_transition_scores(
            out.sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=True
        )  # (B, new tokens) log-probs, 0 after a sequence ended
        texts = self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        found = []
        for text, row in zip(texts, scores, strict=True):
            real = row[torch.isfinite(row) & (row != 0)]
            logp = float(real.mean()) if real.numel() else 0.0
            found.append((" ".join(text.split()), logp))
        return found


def _model_class(path: Path) -> Any:
    """The transformers class that generates text from images for this config."""
    import transformers

    model_type = json.loads((path / "config.json").read_text())["model_type"]
    if model_type == "vision-encoder-decoder":
        return transformers.VisionEncoderDecoderModel
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(f"this transformers has no image-to-text auto class for {model_type!r}")
