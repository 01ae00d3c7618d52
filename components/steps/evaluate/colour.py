"""Colour following, one of the evaluate step's metrics (demo corpus only).

Bases are captioned corpus files that show one object (up to ``evaluate.max_bases``, spread
over the corpus). Each base caption is rewritten with every palette colour that keeps the
corpus's contrast with all of that base's background colours
(:func:`components.core.demo_corpus.recolour_caption`: only the colour word changes), all
variants of a base are sampled with one seed at the base's aspect ratio, and
:mod:`evaluation.prompt_following` reads the colour back. Before scoring generated clips the
same classifier is run on the base files themselves, whose colour the sidecar states: its
accuracy there is the ceiling of the metric and is reported next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.core import artifacts, media, storage
from components.core.config import TesseraConfig
from components.core.demo_corpus import MIN_CONTRAST, PALETTE, background_range, recolour_caption

FACTOR_COLUMNS = {
    "path",
    "num_objects",
    "background",
    "background_colors",
    "objects",
    "primary_color",
    "aspect",
    "kind",
}


def select_bases(factors: list[dict], captions: dict[str, str], max_bases: int) -> list[dict]:
    """Captioned single-object factor rows, evenly spread over the corpus (sorted by path, so
    videos and stills both come up), at most ``max_bases``."""
    rows = sorted(
        (r for r in factors if r["num_objects"] == 1 and captions.get(r["path"])),
        key=lambda r: r["path"],
    )
    if len(rows) <= max_bases:
        return rows
    step = len(rows) / max_bases
    return [rows[int(i * step)] for i in range(max_bases)]


def grid(cells: list[list[tuple[Any, str]]], path: Path) -> None:
    """Rows of (uint8 HxWx3 frame, label) -> one PNG, each label under its frame."""
    from PIL import Image, ImageDraw

    label_h, pad = 12, 4
    cell_w = max(f.shape[1] for row in cells for f, _ in row) + pad
    heights = [max(f.shape[0] for f, _ in row) + label_h + pad for row in cells]
    cols = max(len(row) for row in cells)
    sheet = Image.new("RGB", (cols * cell_w, sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for row, height in zip(cells, heights, strict=True):
        for c, (frame, label) in enumerate(row):
            sheet.paste(Image.fromarray(frame), (c * cell_w, y))
            draw.text((c * cell_w + 1, y + frame.shape[0]), label, fill=(0, 0, 0))
        y += height
    sheet.save(path)


def check_factors(factor_rows: list[dict], uri: str) -> None:
    """Raise unless ``factor_rows`` are a demo-corpus factor sidecar."""
    missing = FACTOR_COLUMNS - set(factor_rows[0] if factor_rows else {})
    if missing:
        raise ValueError(
            f"{uri} is not a demo-corpus factor sidecar: it lacks columns {sorted(missing)} "
            "(write it with `tessera demo-data`)"
        )


def colour_prompt(
    cfg: TesseraConfig,
    base: dict,
    colour: str,
    caption: str,
    short: str | None,
    seed: int,
    expander: Any = None,
) -> tuple[str, dict[str, Any] | None]:
    """The prompt asking for ``colour`` in place of the base's, per ``evaluate.colour_prompts``:
    the recoloured caption, the recoloured short caption, or that short prompt expanded
    (``expander`` = ``(backend, examples)`` of :func:`components.core.expansion.load_backend`).
    Returns the prompt and the expansion's metadata (None unless expanded)."""
    obj = json.loads(base["objects"])[0]
    style = cfg.evaluate.colour_prompts
    if style == "caption":
        return recolour_caption(caption, obj, colour), None
    if not short or obj["color"] not in short.split():
        raise ValueError(
            f"evaluate.colour_prompts={style} needs the short caption of {base['path']} to name "
            f"its colour {obj['color']!r}, got {short!r}; use evaluate.colour_prompts=caption"
        )
    words = short.split()
    words[words.index(obj["color"])] = colour
    prompt = " ".join(words)
    if style == "short":
        return prompt, None
    from components.core import expansion

    backend, examples = expander
    expanded = expansion.expand(prompt, cfg, seed=seed, examples=examples, backend=backend)
    return expanded.text, {"short_prompt": prompt, **expanded.metadata}


def colour_following(
    cfg: TesseraConfig,
    generator: Any,
    clips: str,
    caption_of: dict[str, str],
    factor_rows: list,
    short_of: dict[str, str | None] | None = None,
) -> tuple[dict[str, Any], list[list[tuple[Any, str]]], list[Any]]:
    """Sample every contrasting colour of every base and read the colour back (prompts per
    ``evaluate.colour_prompts``, see :func:`colour_prompt`).

    Returns the summary (score, chance level, tail probability, Wilson interval, classifier
    check, every trial), grid cells (one row per base of (middle frame, "asked>seen")) and the
    sampled clips, uint8 (T, H, W, 3), in trial order.
    """
    from evaluation import prompt_following as pf
    from evaluation.framing import wilson_interval

    ecfg, gcfg = cfg.evaluate, cfg.generate
    bases = select_bases(factor_rows, caption_of, ecfg.max_bases)
    if not bases:
        raise ValueError(
            "the factor sidecar lists no captioned file with a single object, so there is nothing to "
            "recolour; render a larger corpus (demo_data.num_clips)"
        )

    backgrounds = [
        background_range(b["background"], b["background_colors"].split(",")) for b in bases
    ]

    # 1. the classifier on the corpus files themselves (known colours)
    checks = []
    for base, background in zip(bases, backgrounds, strict=True):
        with storage.local_copy(storage.join(clips, base["path"])) as path:
            frames = media.read_frames(path)
        vote = pf.dominant_colour(frames, PALETTE, background, min_distance=ecfg.min_distance)
        checks.append(
            {
                "path": base["path"],
                "colour": base["primary_color"],
                "seen": vote.colour,
                "foreground": vote.foreground,
            }
        )
    classifier_accuracy = sum(c["seen"] == c["colour"] for c in checks) / len(checks)

    # 2. every contrasting colour of every base, one seed per base
    expander = None
    if ecfg.colour_prompts == "expanded":
        from components.core import expansion

        expander = expansion.load_backend(cfg)
    requests, meta, expansions = [], [], []
    for i, (base, background) in enumerate(zip(bases, backgrounds, strict=True)):
        colours = pf.contrasting(PALETTE, background, MIN_CONTRAST)
        frames = 1 if base["kind"] == "image" else ecfg.colour_frames
        size = generator.video_size(base["aspect"], frames)
        for colour in colours:
            prompt, expanded = colour_prompt(
                cfg,
                base,
                colour,
                caption_of[base["path"]],
                (short_of or {}).get(base["path"]),
                gcfg.seed + i,
                expander,
            )
            expansions.append(expanded)
            requests.append(
                {
                    "prompt": prompt,
                    "frames": size[0],
                    "height": size[1],
                    "width": size[2],
                    "seed": gcfg.seed + i,
                }
            )
            meta.append((base, colour, len(colours), background))
    videos, seconds = artifacts.sample(generator, cfg, requests)

    trials, records, cells, clips_u8 = [], [], {}, []
    for req, (base, colour, k, background), video, expanded in zip(
        requests, meta, videos, expansions, strict=True
    ):
        frames = media.to_uint8(video)
        clips_u8.append(frames)
        vote = pf.dominant_colour(frames, PALETTE, background, min_distance=ecfg.min_distance)
        trial = pf.Trial(base=base["path"], asked=colour, seen=vote.colour, variants=k)
        trials.append(trial)
        records.append(
            {
                "base": base["path"],
                "asked": colour,
                "seen": vote.colour,
                "correct": trial.correct,
                "foreground": round(vote.foreground, 4),
                "votes": {c: round(v, 4) for c, v in vote.votes.items()},
                "prompt": req["prompt"],
                "seed": req["seed"],
                "size": [req["frames"], req["height"], req["width"]],
                **({"expansion": expanded} if expanded else {}),
            }
        )
        label = f"{colour[:4]}>{(vote.colour or '-')[:4]}"
        cells.setdefault(base["path"], []).append((frames[len(frames) // 2], label))
    result = pf.score(trials)
    low, high = wilson_interval(result.correct, result.trials, ecfg.confidence)
    summary = {
        **vars(result),
        "prompts": ecfg.colour_prompts,
        "accuracy_low": low,
        "accuracy_high": high,
        "classifier_accuracy_on_corpus": classifier_accuracy,
        "generate_seconds": seconds,
        "classifier_checks": checks,
        "trials": records,
    }
    return summary, list(cells.values()), clips_u8
