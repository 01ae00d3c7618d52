"""The request checks of the tessera-t2v pyfunc (no model needed): every limit names its field,
left-out settings take the model config's defaults, and inputs that hold no prompt are refused."""

from __future__ import annotations

import pandas as pd
import pytest

from components.core.t2v_model import PARAMS, Limits, RequestError, _prompts, check_request

LIMITS = Limits(
    max_batch=2,
    max_prompt_chars=20,
    max_frames=9,
    max_pixels=4096,
    max_steps=10,
    default_frames=5,
    default_steps=3,
)


def test_defaults_beyond_the_limits_are_a_config_error():
    with pytest.raises(ValueError, match="default_frames=17"):
        Limits(max_frames=9)


def test_left_out_settings_take_the_model_configs_defaults():
    limits = Limits.from_config({"default_frames": 5, "default_steps": 3, "max_frames": 9})
    assert Limits.from_config(None) == Limits()
    p = check_request(["a red ball"], {}, limits)
    assert (p["frames"], p["steps"], p["guidance"]) == (5, 3, 4.0)
    assert set(p) == set(PARAMS)
    assert check_request(["x"], {"frames": 9, "steps": 1}, limits)["frames"] == 9


@pytest.mark.parametrize(
    ("prompts", "params", "words"),
    [
        ([], {}, ["no rows"]),
        (["a", "b", "c"], {}, ["3 prompts", "max_batch=2"]),
        ([""], {}, ["row 0", "empty"]),
        (["x" * 21], {}, ["21 characters", "max_prompt_chars=20"]),
        ([3], {}, ["must be a string"]),
        (["x"], {"frames": 10}, ["frames=10", "max_frames=9"]),
        (["x"], {"steps": -2}, ["steps=-2", "max_steps=10"]),
        (["x"], {"guidance": 50.0}, ["guidance=50.0", "max_guidance"]),
        (["x"], {"guidance": "high"}, ["guidance must be a number"]),
        (["x"], {"frames": 2.5}, ["frames must be an integer"]),
        (["x"], {"seed": -1}, ["seed=-1"]),
        (["x"], {"height": 64}, ["give both"]),
        (["x"], {"height": 128, "width": 128}, ["16384 pixels", "max_pixels=4096"]),
        (["x"], {"format": "avi"}, ["format='avi'"]),
        (["x"], {"format": "png", "frames": 5}, ["one frame"]),
    ],
)
def test_a_request_outside_the_limits_names_the_field(prompts, params, words):
    with pytest.raises(RequestError) as info:
        check_request(prompts, params, LIMITS)
    for word in words:
        assert word in str(info.value)


def test_prompts_come_from_a_prompt_column_or_nowhere():
    assert _prompts(pd.DataFrame({"prompt": ["a", "b"]})) == ["a", "b"]
    assert _prompts({"prompt": "a"}) == ["a"] and _prompts(["a"]) == ["a"]
    for bad in (pd.DataFrame({"text": ["a"]}), {"messages": [{"role": "user"}]}, 3):
        with pytest.raises(RequestError, match="prompt"):
            _prompts(bad)
