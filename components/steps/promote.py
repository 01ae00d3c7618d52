"""Move the ``champion`` alias through the promotion gate: the ``promote`` step (``tessera
promote``; the last task of the pipeline DAG and the manual ``tessera_promote`` DAG).

The challenger (``version``, default the ``challenger`` alias) is compared with the current
champion by ``promote.gates`` (:mod:`components.core.promotion`): same extractors and sample
counts or the comparison is refused, saying which differ; the first model needs only the
absolute thresholds. A pass moves ``champion`` (with ``promote.manual_approval``, only with
``approve``); every decision is recorded on the version (``tessera.promotion.*`` tags) and the
champion history, which ``rollback`` walks back.

A refused promotion is a result, not a failure: the step succeeds with ``decision = refused``
and its reason (the pipeline's model stays a challenger); ``tessera promote`` exits non-zero.
Outputs: ``promotion.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.core import promotion, registry
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec

PROMOTION_JSON = "promotion.json"


def run(
    cfg: TesseraConfig,
    workdir: Path,
    version: str = "",
    approve: bool = False,
    rollback: bool = False,
) -> StepResult:
    """Promote ``version`` (default: the challenger), or roll the champion back."""
    pc = cfg.promote
    if rollback:
        if version or approve:
            raise ValueError(
                "promote --rollback restores the previous champion: drop --version/--approve"
            )
        result = registry.rollback(pc).as_dict()
    else:
        try:
            result = registry.promote(pc, version or None, approve=approve, seed=cfg.seed).as_dict()
        except promotion.IncomparableError as e:
            target = version or "challenger"
            result = {
                "name": pc.model_name,
                "version": target,
                "decision": "refused",
                "reason": f"incomparable with the champion: {e}",
                "previous": None,
                "champion": None,
                "checks": [],
            }
            champion = registry.version_by_alias(pc.model_name, registry.CHAMPION)
            result["previous"] = result["champion"] = str(champion.version) if champion else None
            chosen = registry.version_by_alias(pc.model_name, "challenger") if not version else None
            if chosen is not None:
                result["version"] = str(chosen.version)
    (Path(workdir) / PROMOTION_JSON).write_text(json.dumps(result, indent=2) + "\n")
    champion = result["champion"]
    print(
        f"promote: {pc.model_name} version {result['version']}: {result['decision']} "
        f"({result['reason']}); champion: "
        + (f"models:/{pc.model_name}/{champion}" if champion else "none")
    )
    return StepResult(
        files={"promotion": PROMOTION_JSON},
        values={
            "decision": result["decision"],
            "reason": result["reason"],
            "version": str(result["version"]),
            "champion": str(champion) if champion else "",
            "champion_uri": f"models:/{pc.model_name}@{registry.CHAMPION}" if champion else "",
        },
        metrics={"promoted": float(result["decision"] == "promoted")},
        artifacts=[PROMOTION_JSON],
    )


STEP = StepSpec("promote", run)
