"""The evaluate step's fixed prompt sets (``evaluation/prompts/``).

- ``domain.jsonl``: prompts for the demo corpus, one object each, with its factor labels
  (shape, colour, size, texture, motion, speed, start position, background). The caption is
  written per aspect ratio with the corpus's own grammar
  (:func:`components.core.demo_corpus.describe`), so a 9:16 sample is asked for as a "tall 9:16
  portrait" and the one-frame sample as a "still image", as in training.
- ``general.txt``: plain prompts for deployments trained on real footage, used at every aspect.

Prompt ``i`` uses seed ``generate.seed + i`` at every aspect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import evaluation
from components.core.demo_corpus import ClipSpec, ObjectSpec, describe

PROMPTS_DIR = Path(evaluation.__file__).resolve().parent / "prompts"
DOMAIN_FILE, GENERAL_FILE = "domain.jsonl", "general.txt"
SAMPLE_FPS = 8


@dataclass
class Item:
    """One sample of the prompt set: a prompt at one aspect ratio."""

    prompt_id: str
    title: str  # the prompt as shown in the report (the 1:1 wording for domain prompts)
    prompt: str
    aspect: str
    request: dict[str, Any]
    factors: dict[str, Any] | None = None
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return f"{self.prompt_id}_{self.aspect.replace(':', 'x')}"


@dataclass(frozen=True)
class PromptSet:
    name: str
    entries: tuple[dict[str, Any], ...]  # {"id", "prompt"} or the domain factors

    @property
    def domain(self) -> bool:
        return self.name == "domain"

    def text(self, entry: dict[str, Any], aspect: str, frames: int, height: int, width: int) -> str:
        if not self.domain:
            return entry["prompt"]
        image = aspect == "image" or frames == 1
        obj = ObjectSpec(
            shape=entry["shape"],
            color=entry["color"],
            size=entry["size"],
            texture=entry["texture"],
            motion="still" if image else entry["motion"],
            x=entry["x"],
            y=entry["y"],
            phase=0.0,
        )
        spec = ClipSpec(
            path="",
            kind="image" if image else "video",
            width=width,
            height=height,
            aspect="1:1" if aspect == "image" else aspect,
            fps=0 if image else SAMPLE_FPS,
            num_frames=frames,
            speed="none" if image or entry["motion"] == "still" else entry["speed"],
            camera="static",
            background=entry["background"],
            background_colors=tuple(entry["background_colors"]),
            gradient_axis="vertical",
            objects=(obj,),
            captioned=True,
            seed=0,
        )
        return describe(spec)[0]

    def items(self, generator: Any, aspects: Any, frames: int, seed: int) -> list[Item]:
        """Every entry at every aspect, sized by ``generator.video_size``."""
        out = []
        for i, entry in enumerate(self.entries):
            title = None
            for aspect in aspects:
                f, h, w = generator.video_size(aspect, frames)
                prompt = self.text(entry, aspect, f, h, w)
                title = title or prompt
                request = {"prompt": prompt, "frames": f, "height": h, "width": w, "seed": seed + i}
                factors = entry if self.domain else None
                row = {"prompt": entry["id"], "aspect": aspect, "size": f"{f}x{h}x{w}"}
                out.append(Item(entry["id"], title, prompt, aspect, request, factors, row))
        return out


def load(spec: str, demo: bool) -> PromptSet:
    """The prompt set ``spec`` names: ``auto`` (domain when ``demo``, else general), ``domain``,
    ``general``, or a path to a ``.txt`` (one prompt a line, ``#`` comments) or ``.jsonl``."""
    if spec == "auto":
        spec = "domain" if demo else "general"
    path = {"domain": PROMPTS_DIR / DOMAIN_FILE, "general": PROMPTS_DIR / GENERAL_FILE}.get(
        spec, Path(spec)
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluate.prompts: no prompt file {path}; use auto, domain, general or a .txt/.jsonl"
        )
    name = spec if spec in ("domain", "general") else path.stem
    if path.suffix == ".jsonl":
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if spec != "domain":
            entries = [
                {"id": e.get("id", f"p{i}"), "prompt": e["prompt"]} for i, e in enumerate(entries)
            ]
    else:
        lines = [line.strip() for line in path.read_text().splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
        entries = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)]
    if not entries:
        raise ValueError(f"evaluate.prompts: {path} holds no prompts")
    return PromptSet(name, tuple(entries))
