"""Captioner quality: text overlap with reference captions, and attribute accuracy on the demo corpus.

Two views of the same predictions:

- :func:`text_metrics`: corpus BLEU-4 (sacrebleu) and mean ROUGE-L F-measure (rouge_score's)
  against one reference caption per clip. They reward wording, not truth: a caption that names the
  wrong colour in the corpus's phrasing still scores high.
- :func:`attribute_accuracy`: on the demo corpus the truth is known (the factor sidecar), so each
  predicted caption is parsed back into factors with the corpus grammar's parser and compared,
  attribute by attribute, with the clip's factors. Each accuracy comes with the accuracy of always
  answering the majority value (*chance*) and a Wilson interval.

Pure functions; the caption parser is passed in (``components.core.demo_corpus.parse_caption``)
because evaluation imports no pipeline code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evaluation.framing import wilson_interval

ATTRIBUTES = ("colour", "shape", "motion", "background")


# --------------------------------------------------------------------------- text overlap


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one caption, exactly as ``rouge_score``'s
    ``RougeScorer(["rougeL"]).score(reference, prediction).fmeasure`` (its tokenizer, its LCS;
    a test checks they agree) without importing ``rouge_scorer``, whose NLTK import takes ~7 s."""
    from rouge_score.tokenize import tokenize

    pred, ref = tokenize(prediction, None), tokenize(reference, None)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(ref, pred)
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall) if lcs else 0.0


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 and mean ROUGE-L of ``predictions`` against one reference each.

    Args:
        predictions: one generated caption per clip.
        references: the reference caption of the same clip, in the same order.

    Returns:
        ``bleu4``: sacrebleu's corpus BLEU (4-grams, 13a tokenizer, lower-cased) on sacrebleu's
        **0-100 scale**; ``rouge_l``: the mean ROUGE-L F-measure over clips (``rouge_score``, its
        own lower-casing tokenizer, no stemming) on a 0-1 scale; ``n``: the number of clips.
    """
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(
            f"text_metrics needs one reference per prediction, got {len(predictions)} "
            f"predictions and {len(references)} references"
        )
    if not predictions:
        raise ValueError("text_metrics got no predictions; caption at least one clip")
    predictions, references = [str(p) for p in predictions], [str(r) for r in references]
    bleu = sacrebleu.corpus_bleu(predictions, [references], lowercase=True, tokenize="13a")
    rouge = [rouge_l(pred, ref) for pred, ref in zip(predictions, references, strict=True)]
    return {
        "bleu4": float(bleu.score),
        "rouge_l": float(sum(rouge) / len(rouge)),
        "n": float(len(predictions)),
    }


# --------------------------------------------------------------------------- attributes


def _background_value(kind: str | None, colours: Sequence[str] | str | None) -> str | None:
    """``"gradient navy"``: the backdrop's kind and first colour (what the attribute compares)."""
    if isinstance(colours, str):
        colours = colours.split(",")
    if not kind or not colours or not colours[0]:
        return None
    return f"{kind} {colours[0].strip()}"


def _truth(attribute: str, row: Mapping[str, Any]) -> str | None:
    """The factor row's value of ``attribute`` (None: the attribute is not scored on this row)."""
    if attribute == "colour":
        return row.get("primary_color")
    if attribute == "shape":
        return row.get("shape")
    if attribute == "motion":  # a still has no motion to describe: scored on videos only
        return row.get("motion") if row.get("kind") == "video" else None
    return _background_value(row.get("background"), row.get("background_colors"))


def _predicted(attribute: str, parsed: Mapping[str, Any] | None) -> str | None:
    """The value of ``attribute`` a parsed caption states (None: it states none)."""
    if not parsed:
        return None
    if attribute == "background":
        return _background_value(parsed.get("background"), parsed.get("background_colors"))
    objects = parsed.get("objects") or []
    primary = objects[0] if objects and objects[0] else {}
    key = {"colour": "color", "shape": "shape", "motion": "motion"}[attribute]
    return primary.get(key)


def _majority(values: Sequence[str]) -> str | None:
    """The most frequent value (ties: the alphabetically first, so the choice is stable)."""
    counts = Counter(values)
    if not counts:
        return None
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)


def attribute_accuracy(
    predictions: Sequence[str],
    factor_rows: Sequence[Mapping[str, Any]],
    *,
    parse: Callable[[str], Mapping[str, Any] | None],
    train_rows: Sequence[Mapping[str, Any]] | None = None,
    confidence: float = 0.95,
) -> dict[str, dict[str, float]]:
    """How often a predicted descriptive caption states each factor of its clip correctly.

    Attributes (of the demo corpus's factor sidecar, ``FACTORS_SCHEMA``):

    - ``colour``: the primary object's colour (``primary_color``);
    - ``shape``: the primary object's shape (``shape``; the caption's noun, e.g. ball = circle);
    - ``motion``: the primary object's motion (``motion``), **scored on videos only** (a still's
      object always sits still, and its caption says so: it would be free accuracy);
    - ``background``: the backdrop's kind and first colour, e.g. ``"gradient navy"``.

    Args:
        predictions: one predicted descriptive caption per row.
        factor_rows: the factor sidecar's rows of the same clips, in the same order.
        parse: the corpus grammar's parser, ``components.core.demo_corpus.parse_caption``: a
            caption -> a dict of factors (``objects[0]``'s ``color``/``shape``/``motion``,
            ``background``, ``background_colors``), or None when it reads nothing.
        train_rows: the factor rows the captioner was trained on. When given, ``chance`` is the
            accuracy of always answering their majority value; otherwise the majority value of the
            scored rows themselves (an upper bound on what a constant answer can reach).
        confidence: of the Wilson score interval.

    Returns:
        ``{attribute: {"accuracy", "chance", "n", "correct", "unparsed", "low", "high"}}``;
        ``n`` counts the rows scored for the attribute; a caption that cannot be parsed, or that
        does not state the attribute (e.g. truncated before it), is wrong and counted in
        ``unparsed``. An attribute with no scored rows has ``n == 0`` and NaN rates.
    """
    if len(predictions) != len(factor_rows):
        raise ValueError(
            f"attribute_accuracy needs one factor row per prediction, got {len(predictions)} "
            f"predictions and {len(factor_rows)} rows"
        )
    if not predictions:
        raise ValueError("attribute_accuracy got no predictions; caption at least one clip")
    parsed = [parse(str(p)) for p in predictions]
    out: dict[str, dict[str, float]] = {}
    for attribute in ATTRIBUTES:
        pairs = [
            (truth, _predicted(attribute, p))
            for row, p in zip(factor_rows, parsed, strict=True)
            if (truth := _truth(attribute, row)) is not None
        ]
        n = len(pairs)
        correct = sum(truth == guess for truth, guess in pairs)
        reference = [_truth(attribute, r) for r in train_rows] if train_rows is not None else None
        majority = _majority(
            [v for v in reference if v is not None]
            if reference is not None
            else [t for t, _ in pairs]
        )
        low, high = wilson_interval(correct, n, confidence)
        nan = float("nan")
        out[attribute] = {
            "accuracy": correct / n if n else nan,
            "chance": sum(t == majority for t, _ in pairs) / n if n else nan,
            "n": float(n),
            "correct": float(correct),
            "unparsed": float(sum(guess is None for _, guess in pairs)),
            "low": low,
            "high": high,
        }
    return out


__all__ = ["ATTRIBUTES", "attribute_accuracy", "rouge_l", "text_metrics"]
