"""Validate a manifest with a Great Expectations suite; quarantine bad rows, publish Data Docs.

The suite (:func:`build_suite`) is written in code and versioned with it (``SUITE_VERSION``).
Each expectation has a GX ``severity``:

- **critical** (schema, non-empty table, unique ``clip_id``, non-null ``clip_id``/``uri``, split
  proportions): any failure raises :class:`ValidationFailed`; the dataset is unusable as is.
- **warning** = row-level (ranges, value sets, caption lengths): carries ``mostly=validate.mostly``.
  While the unexpected fraction stays within ``1 - mostly`` (GX's own ``success``), the failing
  rows move to quarantine with ``reason = "<expectation type>:<column>"`` and the rest pass;
  beyond that, or if the rows quarantined by all expectations together exceed that fraction,
  the step raises :class:`ValidationFailed`.

Derived columns are added before validation and never written back: ``row_index`` (maps GX's
unexpected rows back exactly), ``is_video`` (images have fps 0, so the fps range only applies to
videos), ``aspect`` (width / height) and ``is_val`` (its mean is the val fraction).

Outputs in ``workdir``: ``manifest.parquet`` (passing rows, input schema and order),
``quarantine.parquet`` (input quarantine + new rows), ``validation_result.json`` and
``data_docs/`` (the GX Data Docs site, ``index.html`` at its root; its CSS/JS are copied into the
site by :func:`components.core.webassets.vendor_assets`, so the pages also work offline).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from components.core import manifest as mf
from components.core import webassets
from components.core.config import TesseraConfig, ValidateConfig, to_dict
from components.core.runner import StepResult, StepSpec

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd

SUITE_NAME = "tessera_manifest"
SUITE_VERSION = "1.0.0"  # bump whenever an expectation or its meaning changes
DATA_DOCS_SITE = "tessera"

# DESIGN §2 columns, in their documented order; extra columns are allowed after them.
REQUIRED_COLUMNS = (
    "clip_id",
    "uri",
    "bytes",
    "container",
    "codec",
    "width",
    "height",
    "fps",
    "num_frames",
    "duration_s",
    "split",
    "caption",
    "caption_source",
    "short_caption",
)
DERIVED_COLUMNS = ("row_index", "is_video", "aspect", "is_val")
EXAMPLES = 5  # failing values quoted per expectation in error messages


class ValidationFailed(RuntimeError):
    """The manifest failed a critical expectation, or too many rows failed a row-level one.

    ``failures`` holds one dict per failed expectation (name, severity, counts, examples).
    """

    def __init__(self, message: str, failures: list[dict[str, Any]]):
        super().__init__(message)
        self.failures = failures


# --------------------------------------------------------------------------- the suite


def build_suite(vcfg: ValidateConfig) -> gx.ExpectationSuite:
    """The manifest expectation suite for thresholds ``vcfg`` (not yet added to a context)."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations

    def critical(expectation_cls, key: str = "", **kwargs):
        return expectation_cls(severity="critical", meta={"config_key": key}, **kwargs)

    def row_level(expectation_cls, key: str = "", **kwargs):
        return expectation_cls(
            severity="warning", mostly=vcfg.mostly, meta={"config_key": key}, **kwargs
        )

    def between(column: str, bounds: tuple[float, float], key: str, **kwargs):
        lo, hi = bounds
        return row_level(
            E.ExpectColumnValuesToBeBetween,
            key,
            column=column,
            min_value=lo,
            max_value=hi,
            **kwargs,
        )

    expectations = [
        critical(
            E.ExpectTableColumnsToMatchSet, column_set=list(REQUIRED_COLUMNS), exact_match=False
        ),
        critical(E.ExpectTableRowCountToBeBetween, min_value=1),
        critical(E.ExpectColumnValuesToNotBeNull, column="clip_id"),
        critical(E.ExpectColumnValuesToNotBeNull, column="uri"),
        critical(E.ExpectColumnValuesToBeUnique, column="clip_id"),
        critical(
            E.ExpectColumnMeanToBeBetween,
            "validate.val_fraction_range",
            column="is_val",
            min_value=vcfg.val_fraction_range[0],
            max_value=vcfg.val_fraction_range[1],
        ),
        between(  # images have fps 0: the fps range is for videos only
            "fps",
            vcfg.fps_range,
            "validate.fps_range",
            row_condition=Column("is_video") == True,  # noqa: E712 (a GX row condition)
        ),
        between("width", vcfg.width_range, "validate.width_range"),
        between("height", vcfg.height_range, "validate.height_range"),
        between("num_frames", vcfg.num_frames_range, "validate.num_frames_range"),
        between("duration_s", vcfg.duration_range_s, "validate.duration_range_s"),
        between("aspect", vcfg.aspect_range, "validate.aspect_range"),
        row_level(
            E.ExpectColumnValueLengthsToBeBetween,
            "validate.caption_chars_range",
            column="caption",
            min_value=vcfg.caption_chars_range[0],
            max_value=vcfg.caption_chars_range[1],
        ),
        row_level(
            E.ExpectColumnValuesToBeInSet,
            column="caption_source",
            value_set=list(mf.CAPTION_SOURCES),
        ),  # nulls pass: not every clip has a caption
        row_level(E.ExpectColumnValuesToNotBeNull, column="split"),
        row_level(E.ExpectColumnValuesToBeInSet, column="split", value_set=list(mf.SPLITS)),
    ]
    return gx.ExpectationSuite(
        name=SUITE_NAME,
        expectations=expectations,
        meta={"tessera_suite_version": SUITE_VERSION, "thresholds": to_dict(vcfg)},
    )


def expectation_name(config: dict[str, Any]) -> str:
    """``expect_column_values_to_be_between:fps`` — also the quarantine ``reason``."""
    return f"{config['type']}:{config['kwargs'].get('column', 'table')}"


# --------------------------------------------------------------------------- the step


def run(
    cfg: TesseraConfig, workdir: Path, manifest: str, quarantine: str | None = None
) -> StepResult:
    """Validate ``manifest`` (a Parquet URI) against the suite; see the module docstring."""
    workdir = Path(workdir)
    vcfg = cfg.validate
    table = mf.read_table(manifest)
    frame = with_derived_columns(table.to_pandas())
    rows_in = table.num_rows

    suite = build_suite(vcfg)
    docs_dir = workdir / "data_docs"
    suite_result = _run_checkpoint(suite, frame, docs_dir)
    webassets.vendor_assets(docs_dir)  # no CDN: the pages load their CSS/JS from the site
    result_json = suite_result.to_json_dict()
    outcomes = [_outcome(r, rows_in) for r in result_json["results"]]

    failures = [o for o in outcomes if not o["success"]]
    row_flags = [o for o in outcomes if o["severity"] != "critical" and o["success"] and o["rows"]]
    bad_rows = sorted({i for o in row_flags for i in o["rows"]})
    max_fraction = 1.0 - vcfg.mostly
    if rows_in and len(bad_rows) / rows_in > max_fraction + 1e-12:
        failures.append(
            {
                "name": "row_level_total",
                "severity": "warning",
                "success": False,
                "unexpected_count": len(bad_rows),
                "element_count": rows_in,
                "detail": (
                    f"{len(bad_rows)} of {rows_in} rows fail some row-level expectation "
                    f"({len(bad_rows) / rows_in:.1%}), above the {max_fraction:.1%} allowed "
                    f"(validate.mostly={vcfg.mostly})"
                ),
                "examples": [],
            }
        )
    if failures:
        failures.sort(key=lambda f: (f["severity"] != "critical", bool(f.get("error"))))
        raise ValidationFailed(_summary(manifest, failures), failures)

    keep = [True] * rows_in
    for i in bad_rows:
        keep[i] = False
    passed = table.filter(pa.array(keep, type=pa.bool_()))
    new_quarantine = _quarantine_rows(table, frame, row_flags)
    quarantined = _concat_quarantine(quarantine, new_quarantine)

    mf.write_table(passed, str(workdir / "manifest.parquet"), cfg.ingest.row_group_size)
    mf.write_table(quarantined, str(workdir / "quarantine.parquet"), cfg.ingest.row_group_size)
    val_fraction = float(frame["is_val"].mean()) if rows_in else 0.0
    summary = {
        "suite": SUITE_NAME,
        "suite_version": SUITE_VERSION,
        "manifest": manifest,
        "success": True,
        "rows_in": rows_in,
        "rows_passed": passed.num_rows,
        "rows_quarantined": len(bad_rows),
        "val_fraction": val_fraction,
        "quarantined_by": {o["name"]: o["unexpected_count"] for o in row_flags},
        "statistics": result_json["statistics"],
    }
    (workdir / "validation_result.json").write_text(
        json.dumps({"summary": summary, "gx_result": result_json}, indent=1, default=str)
    )
    stats = result_json["statistics"]
    values = {
        "success": True,
        "rows_in": rows_in,
        "rows_passed": passed.num_rows,
        "rows_quarantined": len(bad_rows),
        "evaluated_expectations": int(stats["evaluated_expectations"]),
        "failed_expectations": int(stats["unsuccessful_expectations"]),
    }
    metrics = {
        "rows_in": float(rows_in),
        "rows_passed": float(passed.num_rows),
        "rows_quarantined": float(len(bad_rows)),
        "val_fraction": val_fraction,
        "expectations_success_percent": float(stats["success_percent"] or 0.0),
        "row_level_expectations_with_quarantine": float(len(row_flags)),
    }
    return StepResult(
        files={
            "manifest": "manifest.parquet",
            "quarantine": "quarantine.parquet",
            "validation_result": "validation_result.json",
            "data_docs": "data_docs",
        },
        values=values,
        metrics=metrics,
        artifacts=["validation_result.json", "data_docs"],
    )


def with_derived_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the derived columns the suite checks (only from source columns that exist)."""
    import numpy as np

    frame = frame.copy()
    frame["row_index"] = np.arange(len(frame), dtype=np.int64)
    if "kind" in frame:
        frame["is_video"] = frame["kind"].fillna("video") != "image"
    elif "num_frames" in frame:
        frame["is_video"] = frame["num_frames"].fillna(0) > 1
    if "width" in frame and "height" in frame:
        width = frame["width"].astype("float64")
        height = frame["height"].astype("float64")
        # NaN when height is 0 (nulls are skipped by the range; the height range catches it)
        frame["aspect"] = (width / height).where(height > 0)
    if "split" in frame:
        frame["is_val"] = (frame["split"] == "val").fillna(False).astype("float64")
    return frame


# --------------------------------------------------------------------------- GX plumbing


def _run_checkpoint(suite: gx.ExpectationSuite, frame: pd.DataFrame, docs_dir: Path):
    """Validate ``frame`` in an ephemeral context; Data Docs go to ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # "Skipping registering…"
    project_config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            DATA_DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    context = gx.get_context(mode="ephemeral", project_config=project_config)
    batch_definition = (
        context.data_sources.add_pandas("tessera")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("manifest")
    )
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=SUITE_NAME, data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=SUITE_NAME,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=[DATA_DOCS_SITE])],
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": ["row_index", "uri"],
            },
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    (suite_result,) = result.run_results.values()
    return suite_result


def _outcome(result: dict[str, Any], rows_in: int) -> dict[str, Any]:
    """Flatten one GX expectation result into what the step decides on and reports."""
    config = result["expectation_config"]
    details = result.get("result") or {}
    column = config["kwargs"].get("column")
    unexpected = details.get("unexpected_index_list") or []
    error = _exception_message(result.get("exception_info") or {})
    examples = (
        [{"uri": u.get("uri"), "value": _plain(u.get(column))} for u in unexpected[:EXAMPLES]]
        if column
        else []
    )
    return {
        "name": expectation_name(config),
        "type": config["type"],
        "column": column,
        "severity": config.get("severity", "critical"),
        "config_key": (config.get("meta") or {}).get("config_key", ""),
        "kwargs": config["kwargs"],
        "success": bool(result["success"]) and not error,
        "unexpected_count": int(details.get("unexpected_count") or 0),
        "element_count": int(details.get("element_count") or rows_in),
        "observed_value": details.get("observed_value"),
        "mismatched": (details.get("details") or {}).get("mismatched"),
        "rows": [int(u["row_index"]) for u in unexpected if "row_index" in u],
        "values": {
            int(u["row_index"]): _plain(u.get(column)) for u in unexpected if "row_index" in u
        },
        "error": error,
        "examples": examples,
    }


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so messages read ``fps=0.0``."""
    return value.item() if hasattr(value, "item") else value


def _exception_message(info: dict[str, Any]) -> str:
    """GX reports errors either flat or keyed by metric id; return the first message."""
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and (
            value.get("exception_message") or value.get("raised_exception")
        ):
            return str(value.get("exception_message"))
    return ""


def _summary(manifest: str, failures: list[dict[str, Any]]) -> str:
    lines = [f"manifest {manifest} failed validation (suite {SUITE_NAME} v{SUITE_VERSION}):"]
    for f in failures:
        label = "critical" if f["severity"] == "critical" else "row-level"
        lines.append(f"  - [{label}] {f['name']}: {_describe(f)}")
    lines.append(
        "Fix the manifest (re-run ingest) or, if the data is right, the thresholds in the "
        "profile's validate section."
    )
    return "\n".join(lines)


def _describe(f: dict[str, Any]) -> str:
    if f.get("detail"):
        return f["detail"]
    if f["error"]:
        return f"could not be evaluated: {f['error'].splitlines()[0][:200]}"
    if f["mismatched"]:
        missing = f["mismatched"].get("missing") or []
        return f"missing columns {missing}" if missing else f"columns {f['mismatched']}"
    kwargs = f["kwargs"]
    key = f" ({f['config_key']})" if f["config_key"] else ""
    if f["unexpected_count"] == 0:
        lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
        return f"observed {f['observed_value']!r}, expected in [{lo}, {hi}]{key}"
    count, total = f["unexpected_count"], f["element_count"]
    text = f"{count} of {total} rows unexpected ({count / max(total, 1):.1%})"
    if "min_value" in kwargs or "max_value" in kwargs:
        text += f", outside [{kwargs.get('min_value')}, {kwargs.get('max_value')}]"
    text += key
    if "mostly" in kwargs:
        text += (
            f", above the {1 - kwargs['mostly']:.1%} allowed (validate.mostly={kwargs['mostly']})"
        )
    shown = ", ".join(f"{f['column']}={e['value']!r} (uri={e['uri']})" for e in f["examples"])
    return f"{text}; e.g. {shown}" if shown else text


def _row_message(o: dict[str, Any], value: Any) -> str:
    """Human message for a quarantined row failing outcome ``o``."""
    kwargs, column = o["kwargs"], o["column"]
    key = f" ({o['config_key']})" if o["config_key"] else ""
    if o["type"] == "expect_column_values_to_not_be_null":
        return f"{column} is missing"
    if o["type"] == "expect_column_values_to_be_in_set":
        return f"{column}={value!r} is not one of {kwargs['value_set']}"
    bounds = f"[{kwargs.get('min_value')}, {kwargs.get('max_value')}]{key}"
    if o["type"] == "expect_column_value_lengths_to_be_between":
        return f"{column} has {len(str(value))} characters, outside {bounds}"
    return f"{column}={value!r} is outside {bounds}"


def _quarantine_rows(
    table: pa.Table, frame: pd.DataFrame, row_flags: list[dict[str, Any]]
) -> pa.Table:
    """One quarantine row per failing manifest row; reason = its first failing expectation."""
    reasons: dict[int, list[tuple[dict[str, Any], Any]]] = {}
    for o in row_flags:
        for i in o["rows"]:
            reasons.setdefault(i, []).append((o, o["values"].get(i)))
    columns = set(table.column_names)
    rows = []
    for i in sorted(reasons):
        record = frame.iloc[i]
        first = reasons[i][0][0]
        rows.append(
            {
                "uri": record["uri"],
                "reason": first["name"],
                "message": "; ".join(_row_message(o, v) for o, v in reasons[i]),
                "bytes": _scalar(record, "bytes", columns),
                "sha256": _scalar(record, "clip_id", columns),
                "step": "validate",
                "source_version": _scalar(record, "source_version", columns),
            }
        )
    return mf.table_from_rows(rows, mf.QUARANTINE_SCHEMA)


def _scalar(record: pd.Series, column: str, columns: set[str]) -> Any:
    """A plain Python value of ``record[column]``; None when missing or null."""
    import pandas as pd

    if column not in columns or pd.isna(record[column]):
        return None
    return _plain(record[column])


def _concat_quarantine(quarantine: str | None, new_rows: pa.Table) -> pa.Table:
    if not quarantine:
        return new_rows
    previous = mf.read_table(quarantine)
    previous = previous.select(mf.QUARANTINE_SCHEMA.names).cast(mf.QUARANTINE_SCHEMA)
    return pa.concat_tables([previous, new_rows])


STEP = StepSpec("validate", run)
