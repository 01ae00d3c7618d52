"""The demo corpus's contract: file layout, factor vocabulary, caption grammar, sidecar tables.

The demo_data step renders files from these factors and writes ``captions.parquet`` and the
``factors.parquet`` sidecar; the prompt_eval step reads them back (which colour each object
has, which colours contrast with a backdrop) and rewrites captions with another colour. Both
sides use this module, so a word or a colour means the same thing to both.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

CLIPS_DIR = "clips"
CAPTIONS_FILE = "captions.parquet"
FACTORS_FILE = "factors.parquet"


# --------------------------------------------------------------------------- vocabulary

PALETTE: dict[str, tuple[int, int, int]] = {  # object colours
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
    "pink": (245, 120, 180),
}
BACKGROUND_PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "charcoal grey": (60, 60, 66),
    "navy": (20, 30, 80),
    "dark green": (20, 70, 40),
    "maroon": (80, 20, 30),
    "light grey": (200, 200, 200),
    "sky blue": (135, 190, 235),
    "beige": (225, 210, 175),
}
MIN_CONTRAST = 110.0  # RGB distance an object keeps from its background (and from other objects)

SHAPES = ("circle", "square", "triangle", "star", "diamond", "ring")
SHAPE_NOUNS = {
    "circle": "ball",
    "square": "square",
    "triangle": "triangle",
    "star": "star",
    "diamond": "diamond",
    "ring": "ring",
}
SIZES = {"small": 0.12, "medium": 0.18, "large": 0.26}  # half-extent / short side
SIZE_WORDS = {"small": "small", "medium": "medium-sized", "large": "large"}
TEXTURES = ("solid", "striped", "checkered")
MOTIONS = ("still", "bounce", "slide_left", "slide_right", "orbit", "zoom_in", "zoom_out")
SPEEDS = ("slow", "fast")
CAMERAS = ("static", "pan_left", "pan_right")
BACKGROUNDS = ("solid", "gradient", "noise")
PAN_FRACTION = {"slow": 0.2, "fast": 0.4}  # camera travel over a clip, fraction of the width


# --------------------------------------------------------------------------- factors


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str
    texture: str
    motion: str
    x: float  # start position, fraction of the frame (0..1)
    y: float
    phase: float  # 0..1, offsets periodic motions


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render and describe one synthetic file."""

    path: str  # relative to clips/
    kind: str  # "video" | "image"
    width: int
    height: int
    aspect: str  # "16:9"
    fps: int  # 0 for images
    num_frames: int
    speed: str  # "slow" | "fast" | "none" (nothing moves)
    camera: str
    background: str  # "solid" | "gradient" | "noise"
    background_colors: tuple[str, ...]  # one, or two for a gradient
    gradient_axis: str  # "vertical" | "horizontal" (gradients only)
    objects: tuple[ObjectSpec, ...]
    captioned: bool
    seed: int  # of the background noise

    @property
    def primary(self) -> ObjectSpec:
        return self.objects[0]

    @property
    def orientation(self) -> str:
        ratio = self.width / self.height
        return "landscape" if ratio > 1.05 else "portrait" if ratio < 0.95 else "square"


def background_range(
    background: str, colours: Sequence[str]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The RGB segment every backdrop pixel of :func:`_background` lies on: the colour itself
    (plain), the two ends (gradient), or the colour times the noise's 0.5..1.5 (mottled)."""
    first = BACKGROUND_PALETTE[colours[0]]
    if background == "solid":
        return first, first
    if background == "gradient":
        return first, BACKGROUND_PALETTE[colours[1]]
    if background == "noise":
        return (tuple(0.5 * v for v in first), tuple(min(255.0, 1.5 * v) for v in first))
    raise ValueError(f"unknown background {background!r}; choose one of {BACKGROUNDS}")


# --------------------------------------------------------------------------- captions

_ADVERB = {"slow": "slowly", "fast": "quickly", "none": ""}
_MOTION_SHORT = {
    "still": "at rest",
    "bounce": "bouncing",
    "slide_left": "sliding left",
    "slide_right": "sliding right",
    "orbit": "circling",
    "zoom_in": "growing",
    "zoom_out": "shrinking",
}
_COUNT = {1: "one object", 2: "two objects", 3: "three objects"}


def _object_phrase(obj: ObjectSpec) -> str:
    noun, size = SHAPE_NOUNS[obj.shape], SIZE_WORDS[obj.size]
    if obj.texture == "striped":
        return f"{size} {obj.color} {noun} with dark diagonal stripes"
    if obj.texture == "checkered":
        return f"{size} {obj.color} {noun} with a checkered pattern"
    return f"{size} solid {obj.color} {noun}"


def recolour_caption(caption: str, obj: dict, colour: str) -> str:
    """``caption`` with the object whose factors are ``obj`` (an entry of the factor sidecar's
    ``objects`` JSON) given ``colour`` instead; nothing else in the text changes."""
    if colour not in PALETTE:
        raise ValueError(f"unknown object colour {colour!r}; the palette is {sorted(PALETTE)}")
    spec = ObjectSpec(
        shape=obj["shape"],
        color=obj["color"],
        size=obj["size"],
        texture=obj["texture"],
        motion=obj["motion"],
        x=0.5,
        y=0.5,
        phase=0.0,
    )
    old = _object_phrase(spec)
    if old not in caption:
        raise ValueError(f"caption does not describe the object {obj}: {old!r} not in {caption!r}")
    return caption.replace(old, _object_phrase(dataclasses.replace(spec, color=colour)), 1)


def _place(obj: ObjectSpec) -> str:
    row = "upper" if obj.y < 0.42 else "lower" if obj.y > 0.58 else ""
    col = "left" if obj.x < 0.42 else "right" if obj.x > 0.58 else ""
    where = f"{row} {col}".strip()
    return "near the centre of the frame" if not where else f"in the {where} part of the frame"


def _motion_phrase(obj: ObjectSpec, speed: str, video: bool) -> str:
    adverb = _ADVERB[speed]
    fast = speed == "fast"
    if obj.motion == "still":
        return f"{'stays still' if video else 'sits'} {_place(obj)}"
    if obj.motion == "bounce":
        return f"bounces {adverb} up and down" + (" several times" if fast else "")
    if obj.motion == "slide_left":
        return f"slides {adverb} from right to left" + (" across the whole frame" if fast else "")
    if obj.motion == "slide_right":
        return f"slides {adverb} from left to right" + (" across the whole frame" if fast else "")
    if obj.motion == "orbit":
        return f"circles {adverb} around the centre of the frame"
    if obj.motion == "zoom_in":
        return f"grows {adverb}, as if moving toward the camera"
    return f"shrinks {adverb}, as if moving away from the camera"


def _background_phrase(spec: ClipSpec) -> str:
    colors = spec.background_colors
    if spec.background == "gradient":
        ends = (
            ("at the top", "at the bottom")
            if spec.gradient_axis == "vertical"
            else ("on the left", "on the right")
        )
        return f"a smooth gradient from {colors[0]} {ends[0]} to {colors[1]} {ends[1]}"
    if spec.background == "noise":
        return f"a mottled, cloudy {colors[0]} texture"
    return f"plain {colors[0]}"


def describe(spec: ClipSpec) -> tuple[str, str]:
    """(long caption, short caption) of a synthetic file, from its factors alone."""
    video = spec.kind == "video"
    primary = spec.primary
    medium = "video" if video else "still image"
    framing = {
        "landscape": f"wide {spec.aspect} landscape",
        "portrait": f"tall {spec.aspect} portrait",
        "square": f"square {spec.aspect}",
    }[spec.orientation]
    sentences = [
        f"A {framing} {medium} of {_COUNT[len(spec.objects)]} on {_background_phrase(spec)}."
    ]
    for i, obj in enumerate(spec.objects):
        lead = "A" if i == 0 else "Another object, a" if i == 1 else "A third object, a"
        sentences.append(f"{lead} {_object_phrase(obj)} {_motion_phrase(obj, spec.speed, video)}.")
    if video:
        if spec.camera == "static":
            sentences.append("The camera is static.")
        else:
            side = "left" if spec.camera == "pan_left" else "right"
            sentences.append(f"The camera pans {_ADVERB[spec.speed]} to the {side}.")
        seconds = spec.num_frames / spec.fps
        sentences.append(f"The shot lasts {seconds:.1f} seconds at {spec.fps} frames per second.")
    noun = SHAPE_NOUNS[primary.shape]
    short = f"{primary.color} {noun}"
    if video:
        short = f"{short} {_MOTION_SHORT[primary.motion]}"
    return " ".join(sentences), short


# --------------------------------------------------------------------------- parsing captions
# The inverse of describe(): what a caption in its grammar states, for scoring a captioner's
# output against the factors. Sentences are read by how they start, so a caption cut short (a
# captioner's max_new_tokens) or with a sentence missing still yields every field it states.


def _alternation(words) -> str:
    """A regex alternation of ``words``, longest first (so "dark green" wins over "green")."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_NOUN_SHAPE = {noun: shape for shape, noun in SHAPE_NOUNS.items()}
_WORD_SIZE = {word: size for size, word in SIZE_WORDS.items()}
_NUMBER = {"one": 1, "two": 2, "three": 3}
_ORIENTATION = {"wide": "landscape", "tall": "portrait", "square": "square"}
_SPEED = {"slowly": "slow", "quickly": "fast"}
_SHORT_MOTION = {phrase: motion for motion, phrase in _MOTION_SHORT.items()}
_COLOUR = _alternation(PALETTE)
_BG_COLOUR = _alternation(BACKGROUND_PALETTE)
_NOUN = _alternation(_NOUN_SHAPE)
_ADVERBS = r"(?: (?P<adverb>slowly|quickly))?"

_HEADER = re.compile(
    r"a (?P<framing>wide|tall|square)(?: (?P<aspect>\d+:\d+)\b"
    r"(?:(?: landscape| portrait)? (?P<medium>video|still image)"
    r"(?: of (?P<count>one|two|three) objects?(?: on (?P<background>.*))?)?)?)?"
)
_GRADIENT = re.compile(
    rf"a smooth gradient(?: from (?P<first>{_BG_COLOUR})\b"
    r"(?: (?P<end>at the top|at the bottom|on the left|on the right)"
    rf"(?: to (?P<second>{_BG_COLOUR})\b)?)?)?"
)
_NOISE = re.compile(rf"a mottled, cloudy(?: (?P<first>{_BG_COLOUR})\b)?")
_PLAIN = re.compile(rf"plain(?: (?P<first>{_BG_COLOUR})\b)?")
_OBJECT = re.compile(
    rf"(?P<lead>a|another object, a|a third object, a) (?P<size>small|medium-sized|large)\b"
    rf"(?: (?P<solid>solid)\b)?(?: (?P<color>{_COLOUR})\b(?: (?P<noun>{_NOUN})\b"
    r"(?P<pattern> with dark diagonal stripes| with a checkered pattern)?(?: (?P<motion>.*))?)?)?"
)
_MOTIONS = (  # (pattern at the start of an object's motion phrase, motion)
    (re.compile(r"(?:stays still|sits)\b"), "still"),
    (re.compile(rf"bounces\b{_ADVERBS}"), "bounce"),
    (re.compile(rf"slides\b{_ADVERBS} from right\b"), "slide_left"),
    (re.compile(rf"slides\b{_ADVERBS} from left\b"), "slide_right"),
    (re.compile(rf"circles\b{_ADVERBS}"), "orbit"),
    (re.compile(rf"grows\b{_ADVERBS}"), "zoom_in"),
    (re.compile(rf"shrinks\b{_ADVERBS}"), "zoom_out"),
)
_PLACE = re.compile(
    r"(?:stays still|sits) (?:near the (?P<centre>centre)|in the (?P<where>.+?) part)"
)
_CAMERA = re.compile(
    r"the camera (?:(?P<static>is static)|pans(?: (?P<adverb>slowly|quickly))?(?: to the "
    r"(?P<side>left|right)\b)?)"
)
_SHOT = re.compile(
    r"the shot lasts (?P<seconds>\d+(?:\.\d+)?) seconds(?: at (?P<fps>\d+) frames\b)?"
)


def _normalise(text: str) -> list[str]:
    """Lower-case sentences, with the spacing an uncased tokenizer's decoder may add undone
    ("16 : 9", "medium - sized", "2. 0", "mottled , cloudy")."""
    text = " ".join(text.lower().split())
    text = re.sub(r"\s*([:-])\s*", r"\1", text)
    text = re.sub(r"(\d)\s*\.\s*(\d)", r"\1.\2", text)
    text = re.sub(r"\s+([.,])", r"\1", text)
    return [s.strip() for s in re.split(r"\.(?:\s+|$)", text) if s.strip()]


def _parse_background(phrase: str) -> dict[str, Any]:
    for kind, pattern in (("gradient", _GRADIENT), ("noise", _NOISE), ("solid", _PLAIN)):
        m = pattern.match(phrase)
        if m:
            colours = [m["first"], m.groupdict().get("second")] if m["first"] else []
            axis = None
            if kind == "gradient" and m["end"]:
                axis = "vertical" if m["end"].startswith("at the") else "horizontal"
                if m["end"] in ("at the bottom", "on the right"):  # stated from the far end
                    colours = [colours[1], colours[0]] if colours[1] else []
            return {
                "background": kind,
                "background_colors": tuple(c for c in colours if c) or None,
                "gradient_axis": axis,
            }
    return {}


def _parse_object(m: re.Match) -> dict[str, Any]:
    texture = None
    if m["solid"]:
        texture = "solid"
    elif m["pattern"]:
        texture = "striped" if "stripes" in m["pattern"] else "checkered"
    motion = place = adverb = None
    phrase = m["motion"] or ""
    for pattern, name in _MOTIONS:
        found = pattern.match(phrase)
        if found:
            motion, adverb = name, found.groupdict().get("adverb")
            break
    if motion == "still" and (p := _PLACE.match(phrase)):
        place = "centre" if p["centre"] else p["where"]
    return {
        "size": _WORD_SIZE[m["size"]],
        "color": m["color"],
        "shape": _NOUN_SHAPE.get(m["noun"] or ""),
        "texture": texture,
        "motion": motion,
        "place": place,  # "centre", "upper left", ... (stated for objects that stay put)
        "_speed": _SPEED.get(adverb or ""),
    }


_FIELDS = (
    "kind",
    "orientation",
    "aspect",
    "num_objects",
    "background",
    "background_colors",
    "gradient_axis",
    "camera",
    "speed",
    "fps",
    "duration_s",
)
_OBJECT_FIELDS = ("size", "color", "shape", "texture", "motion", "place")


def parse_caption(caption: str) -> dict[str, Any] | None:
    """The factors a descriptive caption of :func:`describe`'s grammar states.

    Case-insensitive, and tolerant to a caption cut short or missing sentences: every field the
    text does not state is None. ``kind`` is ``"video"`` or ``"image"`` (a "still image");
    a still's ``camera`` is ``"static"`` and its ``speed`` ``"none"`` (the grammar implies them);
    a video's ``speed`` is read from the adverbs ("slowly", "quickly"), and is ``"none"`` only
    when every object is read as still under a static camera.

    Returns:
        ``{"kind", "orientation", "aspect", "num_objects", "background" (solid | gradient |
        noise), "background_colors" (tuple; a gradient's top or left colour first, in whichever
        order the caption names its ends), "gradient_axis", "camera", "speed", "fps",
        "duration_s", "objects": [{"size", "color", "shape", "texture", "motion", "place"}, ...]}``
        (``objects`` in caption order, an object whose sentence is missing all None), or None
        when no sentence of the grammar can be read.
    """
    out: dict[str, Any] = dict.fromkeys(_FIELDS)
    objects: dict[int, dict[str, Any]] = {}
    speeds: list[str] = []
    read = False
    for sentence in _normalise(caption):
        if m := _OBJECT.match(sentence):
            index = {"a": 0, "another object, a": 1}.get(m["lead"], 2)
            objects.setdefault(index, _parse_object(m))
        elif m := _HEADER.match(sentence):
            out["orientation"] = _ORIENTATION[m["framing"]]
            out["aspect"] = m["aspect"]
            if m["medium"]:
                out["kind"] = "video" if m["medium"] == "video" else "image"
            out["num_objects"] = _NUMBER.get(m["count"] or "")
            out.update(_parse_background(m["background"] or ""))
        elif m := _CAMERA.match(sentence):
            if m["static"]:
                out["camera"] = "static"
            elif m["side"]:
                out["camera"] = f"pan_{m['side']}"
            if m["adverb"]:
                speeds.append(_SPEED[m["adverb"]])
        elif m := _SHOT.match(sentence):
            out["duration_s"] = float(m["seconds"])
            out["fps"] = int(m["fps"]) if m["fps"] else None
        else:
            continue
        read = True
    if not read:
        return None
    ordered = [
        objects.get(i) or dict.fromkeys(_OBJECT_FIELDS) for i in range(max(objects, default=-1) + 1)
    ]
    speeds += [s for o in ordered if (s := o.pop("_speed", None))]
    out["objects"] = ordered
    if out["kind"] == "image":
        out["camera"], out["speed"] = "static", "none"
    elif speeds:
        out["speed"] = speeds[0]
    elif (
        out["camera"] == "static"
        and out["num_objects"] == len(ordered)
        and all(o["motion"] == "still" for o in ordered)
    ):
        out["speed"] = "none"
    return out


_SHORT = re.compile(
    rf"(?P<color>{_COLOUR})\b(?: (?P<noun>{_NOUN})\b(?: (?P<motion>"
    rf"{_alternation(_SHORT_MOTION)})\b)?)?"
)


def parse_short_caption(text: str) -> dict[str, Any] | None:
    """``{"color", "shape", "motion"}`` of a short caption (``"red ball bouncing"``; a still's
    has no motion: None), case-insensitive; None when it does not start with a palette colour."""
    m = _SHORT.match(" ".join(text.lower().replace(".", " ").split()))
    if not m:
        return None
    return {
        "color": m["color"],
        "shape": _NOUN_SHAPE.get(m["noun"] or ""),
        "motion": _SHORT_MOTION.get(m["motion"] or ""),
    }


# --------------------------------------------------------------------------- sidecar tables


CAPTIONS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # relative to clips/
        ("caption", pa.string()),
        ("short_caption", pa.string()),
        ("caption_source", pa.string()),
    ]
)

FACTORS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("kind", pa.string()),  # "video" | "image"
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.int32()),  # 0 for images
        ("num_frames", pa.int32()),
        ("aspect", pa.string()),  # "16:9"
        ("orientation", pa.string()),  # landscape | portrait | square
        ("primary_color", pa.string()),
        ("shape", pa.string()),
        ("size", pa.string()),
        ("motion", pa.string()),
        ("speed", pa.string()),  # slow | fast | none
        ("texture", pa.string()),
        ("background", pa.string()),  # solid | gradient | noise
        ("background_colors", pa.string()),  # "navy" or "navy,black"
        ("camera", pa.string()),
        ("num_objects", pa.int32()),
        ("objects", pa.string()),  # JSON list of every object's factors (+ start x, y, phase)
        ("captioned", pa.bool_()),
        ("primary_cut", pa.bool_()),  # the main object is cut by the frame edge in some frame
    ]
)
