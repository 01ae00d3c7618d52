import dataclasses

import pytest

from components.core.config import DemoDataConfig
from components.core.demo_corpus import (
    ClipSpec,
    describe,
    parse_caption,
    parse_short_caption,
)
from components.steps.demo_data import plan_corpus


def random_specs(seed: int) -> list[ClipSpec]:
    """Specs drawn the way the demo_data step draws them (videos, then stills)."""
    return plan_corpus(DemoDataConfig(num_clips=60, num_images=20, seed=seed))


SPECS = [s for seed in range(4) for s in random_specs(seed)]


def expected(spec: ClipSpec) -> dict:
    """The factors a descriptive caption of ``spec`` states."""
    video = spec.kind == "video"
    return {
        "kind": spec.kind,
        "orientation": spec.orientation,
        "aspect": spec.aspect,
        "num_objects": len(spec.objects),
        "background": spec.background,
        "background_colors": spec.background_colors,
        "gradient_axis": spec.gradient_axis if spec.background == "gradient" else None,
        "camera": spec.camera,
        "speed": spec.speed,
        "fps": spec.fps if video else None,
        "duration_s": round(spec.num_frames / spec.fps, 1) if video else None,
        "objects": [
            {
                "size": o.size,
                "color": o.color,
                "shape": o.shape,
                "texture": o.texture,
                "motion": o.motion,
            }
            for o in spec.objects
        ],
    }


def without_places(parsed: dict) -> dict:
    return {
        **parsed,
        "objects": [{k: v for k, v in o.items() if k != "place"} for o in parsed["objects"]],
    }


def test_parse_caption_recovers_the_factors():
    assert {s.kind for s in SPECS} == {"video", "image"}
    for spec in SPECS:
        caption = describe(spec)[0]
        assert without_places(parse_caption(caption)) == expected(spec), caption


def test_parse_caption_is_case_and_spacing_insensitive():
    for spec in SPECS[::7]:
        caption = describe(spec)[0]
        assert parse_caption(caption.lower()) == parse_caption(caption)
        assert parse_caption(caption.upper()) == parse_caption(caption)
        # an uncased word-piece decoder's spacing: "16 : 9", "medium - sized", "2. 0", "a , b"
        spaced = (
            caption.lower()
            .replace(":", " : ")
            .replace("-", " - ")
            .replace(",", " ,")
            .replace(".", ". ")
        )
        assert parse_caption(spaced) == parse_caption(caption), spaced


def test_parse_caption_reads_where_a_still_object_sits():
    spec = next(s for s in SPECS if s.kind == "image")
    for (x, y), place in (
        ((0.5, 0.5), "centre"),
        ((0.2, 0.2), "upper left"),
        ((0.8, 0.5), "right"),
        ((0.5, 0.8), "lower"),
    ):
        moved = dataclasses.replace(
            spec, objects=(dataclasses.replace(spec.primary, x=x, y=y), *spec.objects[1:])
        )
        assert parse_caption(describe(moved)[0])["objects"][0]["place"] == place


def test_parse_caption_reads_a_gradient_named_from_either_end():
    """A mirrored caption (the captioner's training augmentation) names the ends the other way
    round; ``background_colors`` stays top/left colour first."""
    start = "A square 1:1 still image of one object on a smooth gradient from"
    for text, colours, axis in (
        ("navy on the left to beige on the right", ("navy", "beige"), "horizontal"),
        ("beige on the right to navy on the left", ("navy", "beige"), "horizontal"),
        ("beige at the bottom to navy at the top", ("navy", "beige"), "vertical"),
        ("beige on the right", None, "horizontal"),  # cut short: the left colour is unknown
    ):
        parsed = parse_caption(f"{start} {text}.")
        assert (parsed["background_colors"], parsed["gradient_axis"]) == (colours, axis), text


def test_parse_caption_of_a_truncated_caption_states_only_what_is_there():
    """Cut anywhere (even mid-word), the parse never states a wrong factor."""
    for spec in SPECS[::9]:
        caption = describe(spec)[0]
        truth = expected(spec)
        for end in range(0, len(caption), 3):
            parsed = parse_caption(caption[:end])
            if parsed is None:
                continue
            for key, value in parsed.items():
                if key == "objects":
                    for got, want in zip(value, truth["objects"], strict=False):
                        wrong = {k: v for k, v in got.items() if v is not None and k != "place"}
                        assert all(want[k] == v for k, v in wrong.items()), caption[:end]
                elif value is not None and key != "background_colors":
                    assert value == truth[key], (key, caption[:end])
                elif value is not None:  # a gradient cut after its first colour
                    assert truth[key][: len(value)] == value, caption[:end]


def test_parse_caption_of_a_caption_cut_after_the_first_object():
    spec = next(s for s in SPECS if s.kind == "video" and len(s.objects) == 3)
    sentences = describe(spec)[0].split(". ")
    parsed = parse_caption(". ".join(sentences[:2]))
    assert parsed["num_objects"] == 3 and len(parsed["objects"]) == 1
    assert parsed["objects"][0]["color"] == spec.primary.color
    assert parsed["camera"] is None and parsed["fps"] is None
    # a missing middle sentence leaves a hole, not a shifted object
    parsed = parse_caption(". ".join([sentences[0], sentences[2]]))
    assert parsed["objects"][0] == dict.fromkeys(parsed["objects"][0])
    assert parsed["objects"][1]["color"] == spec.objects[1].color


@pytest.mark.parametrize("text", ["", "a cat on a mat", "A wi", "red"])
def test_parse_caption_of_text_outside_the_grammar_is_none(text):
    assert parse_caption(text) is None


def test_parse_short_caption():
    for spec in SPECS:
        short = describe(spec)[1]
        want = {
            "color": spec.primary.color,
            "shape": spec.primary.shape,
            "motion": spec.primary.motion if spec.kind == "video" else None,
        }
        assert parse_short_caption(short) == want
        assert parse_short_caption(short.upper() + ".") == want
    assert parse_short_caption("red bal") == {"color": "red", "shape": None, "motion": None}
    assert parse_short_caption("a red ball") is None
