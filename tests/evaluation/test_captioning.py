import math

import pytest

from evaluation.captioning import ATTRIBUTES, attribute_accuracy, rouge_l, text_metrics

# --------------------------------------------------------------------------- text_metrics


def test_identical_captions_score_perfectly():
    refs = ["A small solid red ball bounces slowly up and down.", "A large blue star sits still."]
    m = text_metrics(refs, refs)
    assert m["bleu4"] == pytest.approx(100.0)
    assert m["rouge_l"] == pytest.approx(1.0)
    assert m["n"] == 2


def test_text_metrics_are_case_insensitive_and_order_sensitive():
    refs = ["a small solid red ball bounces slowly up and down near the centre of the frame"]
    assert text_metrics([refs[0].upper()], refs)["bleu4"] == pytest.approx(100.0)
    shuffled = [" ".join(reversed(refs[0].split()))]
    m = text_metrics(shuffled, refs)
    assert m["bleu4"] < 10.0
    assert 0.0 < m["rouge_l"] < 0.5


@pytest.mark.slow  # rouge_score's scorer imports NLTK (~7 s)
def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = [
        ("A small solid red ball bounces.", "a small red ball bounces slowly up and down"),
        ("the camera pans to the left", "The camera is static."),
        ("", "a ring"),
        ("red ball, red ball!", "ball red"),
        ("a wide 16:9 landscape video", "A tall 9:16 portrait video of one object"),
    ]
    for pred, ref in pairs:
        assert rouge_l(pred, ref) == pytest.approx(scorer.score(ref, pred)["rougeL"].fmeasure)


def test_text_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="one reference per prediction"):
        text_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no predictions"):
        text_metrics([], [])


# --------------------------------------------------------------------------- attribute_accuracy


def _row(colour="red", shape="circle", motion="bounce", kind="video", bg="solid", bgc="navy"):
    return {
        "primary_color": colour,
        "shape": shape,
        "motion": motion,
        "kind": kind,
        "background": bg,
        "background_colors": bgc,
    }


def _parse(text):
    """A stand-in parser: ``"colour shape motion background colour"`` words, or None."""
    words = text.split()
    if len(words) != 5:
        return None
    colour, shape, motion, bg, bgc = words
    return {
        "objects": [{"color": colour, "shape": shape, "motion": motion}],
        "background": bg,
        "background_colors": (bgc,),
    }


def test_attribute_accuracy_counts_right_wrong_and_unparsed():
    rows = [
        _row(),
        _row(colour="blue", motion="orbit", bg="gradient", bgc="navy,black"),
        _row(kind="image", motion="still"),
        _row(colour="green"),
    ]
    preds = [
        "red circle bounce solid navy",  # all right
        "red circle orbit gradient navy",  # colour wrong
        "red circle bounce solid navy",  # a still: motion not scored
        "not a caption",  # unparsed: wrong everywhere
    ]
    acc = attribute_accuracy(preds, rows, parse=_parse)
    assert set(acc) == set(ATTRIBUTES)
    assert acc["colour"]["accuracy"] == pytest.approx(2 / 4)
    assert acc["shape"]["accuracy"] == pytest.approx(3 / 4)
    assert acc["motion"]["n"] == 3 and acc["motion"]["accuracy"] == pytest.approx(2 / 3)
    assert acc["background"]["accuracy"] == pytest.approx(3 / 4)
    for a in ATTRIBUTES:
        assert acc[a]["unparsed"] == 1
        assert acc[a]["low"] <= acc[a]["accuracy"] <= acc[a]["high"]
    # chance: always answering the majority of the scored rows (red: 2 of 4; circle: 4 of 4)
    assert acc["colour"]["chance"] == pytest.approx(2 / 4)
    assert acc["shape"]["chance"] == pytest.approx(1.0)


def test_chance_uses_the_training_majority_when_given():
    rows = [_row(colour="red"), _row(colour="red"), _row(colour="blue")]
    preds = ["red circle bounce solid navy"] * 3
    train = [_row(colour="blue")] * 5 + [_row(colour="red")] * 2
    acc = attribute_accuracy(preds, rows, parse=_parse, train_rows=train)
    assert acc["colour"]["chance"] == pytest.approx(1 / 3)  # "blue" is right on one of three
    assert acc["colour"]["accuracy"] == pytest.approx(2 / 3)


def test_attribute_accuracy_with_no_videos_scores_no_motion():
    acc = attribute_accuracy(["x"], [_row(kind="image", motion="still")], parse=_parse)
    assert acc["motion"]["n"] == 0 and math.isnan(acc["motion"]["accuracy"])


def test_attribute_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="one factor row per prediction"):
        attribute_accuracy(["a"], [], parse=_parse)
    with pytest.raises(ValueError, match="no predictions"):
        attribute_accuracy([], [], parse=_parse)


def test_attribute_accuracy_with_the_corpus_parser():
    from components.core.config import DemoDataConfig
    from components.core.demo_corpus import describe, parse_caption
    from components.steps.demo_data import plan_corpus

    specs = plan_corpus(DemoDataConfig(num_clips=14, num_images=6, seed=3))
    rows = [
        {
            "primary_color": s.primary.color,
            "shape": s.primary.shape,
            "motion": s.primary.motion,
            "kind": s.kind,
            "background": s.background,
            "background_colors": ",".join(s.background_colors),
        }
        for s in specs
    ]
    captions = [describe(s)[0] for s in specs]
    acc = attribute_accuracy([c.lower() for c in captions], rows, parse=parse_caption)
    for a in ATTRIBUTES:
        assert acc[a]["accuracy"] == 1.0, a
    # truncated before the object: colour, shape and motion unread, the backdrop still read
    cut = [c.split(". ")[0] for c in captions]
    acc = attribute_accuracy(cut, rows, parse=parse_caption)
    assert acc["colour"]["accuracy"] == 0.0 and acc["colour"]["unparsed"] == 20
    assert acc["background"]["accuracy"] == 1.0
