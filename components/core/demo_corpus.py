"""The demo corpus's contract: file layout, factor vocabulary, caption grammar, sidecar tables.

The demo_data step renders files from these factors and writes ``captions.parquet`` and the
``factors.parquet`` sidecar; the prompt_eval step reads them back (which colour each object
has, which colours contrast with a backdrop) and rewrites captions with another colour. Both
sides use this module, so a word or a colour means the same thing to both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

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
