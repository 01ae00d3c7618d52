"""Colour-following check of a trained model against the demo corpus's factor sidecar: the
``prompt_eval`` step (``tessera prompt-eval``).

Bases are captioned corpus files that show one object (up to ``prompt_eval.max_bases``, spread
over the corpus). Each base caption is rewritten with every palette colour that keeps the
corpus's contrast with all of that base's background colours
(:func:`components.core.demo_corpus.recolour_caption`: only the colour word changes), all
variants of a base are sampled with one seed at the base's aspect ratio, and
:mod:`evaluation.prompt_following` reads the colour back. Before scoring generated clips the
same classifier is run on the base files themselves, whose colour the sidecar states: its
accuracy there is the ceiling of the metric and is reported next to it.

Outputs in ``workdir``: ``prompt_eval.json`` (score, chance level, tail probability, classifier
check, every trial) and ``prompt_eval.png`` (a grid: one row per base, one column per colour,
the middle frame of each variant, labelled by asked / seen colour).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from components.core import artifacts, media, storage
from components.core.config import TesseraConfig
from components.core.demo_corpus import MIN_CONTRAST, PALETTE, background_range, recolour_caption
from components.core.runner import StepResult, StepSpec

log = logging.getLogger(__name__)

RESULT_JSON = "prompt_eval.json"
GRID_PNG = "prompt_eval.png"


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


def _read_parquet(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def _grid(cells: list[list[tuple[Any, str]]], path: Path) -> None:
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


def run(
    cfg: TesseraConfig, workdir: Path, model: str, clips: str, captions: str, factors: str
) -> StepResult:
    """Score how well ``model`` follows the colour word of corpus captions.

    Args:
        model: URI of a directory with ``vae/`` and ``dit/`` (train_dit's output).
        clips: URI of the corpus's ``clips/`` directory (demo_data's output).
        captions: URI of the corpus's ``captions.parquet``.
        factors: URI of the corpus's ``factors.parquet`` (the generative factors of every file).
    """
    from evaluation import prompt_following as pf

    workdir = Path(workdir)
    pcfg, gcfg = cfg.prompt_eval, cfg.generate
    caption_of = {r["path"]: r["caption"] for r in _read_parquet(captions)}
    factor_rows = _read_parquet(factors)
    missing = {
        "path",
        "num_objects",
        "background",
        "background_colors",
        "objects",
        "primary_color",
        "aspect",
        "kind",
    } - set(factor_rows[0] if factor_rows else {})
    if missing:
        raise ValueError(
            f"{factors} is not a demo-corpus factor sidecar: it lacks columns "
            f"{sorted(missing)} (write it with `tessera demo-data`)"
        )
    bases = select_bases(factor_rows, caption_of, pcfg.max_bases)
    if not bases:
        raise ValueError(
            f"{factors} lists no captioned file with a single object, so there is nothing to "
            "recolour; render a larger corpus (demo_data.num_clips)"
        )

    backgrounds = [
        background_range(b["background"], b["background_colors"].split(",")) for b in bases
    ]

    # 1. the classifier on the corpus files themselves (known colours)
    checks = []
    for base, background in zip(bases, backgrounds, strict=True):
        with storage.local_copy(storage.join(clips, base["path"])) as path:
            frames = media.to_uint8(media.load_video(path))
        vote = pf.dominant_colour(frames, PALETTE, background, min_distance=pcfg.min_distance)
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
    with artifacts.model_dir(model) as directory:
        generator = artifacts.load_generator(cfg, directory)
    requests, meta = [], []
    for i, (base, background) in enumerate(zip(bases, backgrounds, strict=True)):
        obj = json.loads(base["objects"])[0]
        colours = pf.contrasting(PALETTE, background, MIN_CONTRAST)
        frames = 1 if base["kind"] == "image" else pcfg.frames
        size = generator.video_size(base["aspect"], frames)
        for colour in colours:
            requests.append(
                {
                    "prompt": recolour_caption(caption_of[base["path"]], obj, colour),
                    "frames": size[0],
                    "height": size[1],
                    "width": size[2],
                    "seed": gcfg.seed + i,
                }
            )
            meta.append((base, colour, len(colours), background))
    videos, seconds = artifacts.sample(generator, cfg, requests)

    trials, records, cells = [], [], {}
    for req, (base, colour, k, background), video in zip(requests, meta, videos, strict=True):
        frames = media.to_uint8(video)
        vote = pf.dominant_colour(frames, PALETTE, background, min_distance=pcfg.min_distance)
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
            }
        )
        label = f"{colour[:4]}>{(vote.colour or '-')[:4]}"
        cells.setdefault(base["path"], []).append((frames[len(frames) // 2], label))
    result = pf.score(trials)
    _grid(list(cells.values()), workdir / GRID_PNG)
    summary = {
        **vars(result),
        "classifier_accuracy_on_corpus": classifier_accuracy,
        "generate_seconds": seconds,
        "steps": gcfg.steps,
        "guidance": gcfg.guidance,
        "sampler": gcfg.sampler,
        "classifier_checks": checks,
        "trials": records,
    }
    (workdir / RESULT_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "prompt_eval: colour accuracy %.3f (%d/%d) vs chance %.3f, p=%.2g; classifier on "
        "corpus %.3f; %d clips in %.1f s",
        result.accuracy,
        result.correct,
        result.trials,
        result.chance,
        result.p_value,
        classifier_accuracy,
        len(videos),
        seconds,
    )
    return StepResult(
        files={"result": RESULT_JSON, "grid": GRID_PNG},
        values={
            "colour_accuracy": result.accuracy,
            "colour_chance": result.chance,
            "colour_p_value": result.p_value,
            "trials": result.trials,
        },
        metrics={
            **result.as_metrics(),
            "colour_classifier_accuracy": classifier_accuracy,
            "generate_seconds": seconds,
        },
        artifacts=[RESULT_JSON, GRID_PNG],
    )


STEP = StepSpec("prompt_eval", run)
