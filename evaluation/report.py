"""The evaluation report: one self-contained HTML page, readable offline.

Every image and video is embedded as a ``data:`` URI (no network, no files beside it to lose),
the style is inline, and there is no script. Sections: the metric table (value, interval, N,
extractor and its sha256), sample grids per prompt and aspect ratio, VAE reconstruction examples,
the scaling plot when a sweep exists, tables of per-prompt numbers, and the lineage (dataset
revision, runs, git sha).

Pure Python: the caller encodes media (WebM/GIF/PNG bytes) and passes them in.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Media:
    """An encoded image or video and its MIME type (``video/webm``, ``image/gif``, ``image/png``)."""

    data: bytes
    mime: str
    caption: str = ""

    @property
    def uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True)
class MetricRow:
    name: str  # carries its extractor: fvd_domain, clip_score_domain, ...
    value: float
    low: float = math.nan
    high: float = math.nan
    n: str = ""  # e.g. "64 real / 64 fake"
    extractor: str = ""  # e.g. "domain sha256 1a2b3c4d"
    note: str = ""


@dataclass
class Report:
    title: str
    summary: str = ""
    metrics: list[MetricRow] = field(default_factory=list)
    grids: list[tuple[str, list[tuple[str, Media]]]] = field(default_factory=list)  # prompt, cells
    reconstructions: list[Media] = field(default_factory=list)
    figures: list[Media] = field(default_factory=list)  # e.g. the scaling plot
    tables: list[tuple[str, list[Mapping[str, object]]]] = field(default_factory=list)
    lineage: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # warnings shown under the metric table


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;
max-width:1200px}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:.8em;align-items:flex-end}
figure{margin:0;text-align:center}figcaption{font-size:.8em;color:#555}
video,img{image-rendering:pixelated;background:#000}
.notes{color:#8a5300}code{background:#f6f6f6;padding:0 .2em}
"""


def _num(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return html.escape(str(value))
    if math.isnan(value):
        return "–"
    return f"{value:.4g}"


def _media(item: Media, width: int) -> str:
    if item.mime.startswith("video/"):
        tag = (
            f'<video src="{item.uri}" width="{width}" autoplay loop muted playsinline '
            'preload="auto"></video>'
        )
    else:
        tag = f'<img src="{item.uri}" width="{width}" alt="{html.escape(item.caption)}">'
    caption = f"<figcaption>{html.escape(item.caption)}</figcaption>" if item.caption else ""
    return f"<figure>{tag}{caption}</figure>"


def _table(rows: Sequence[Mapping[str, object]], table_id: str = "") -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    attr = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_num(row.get(c, ""))}</td>'
            if isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
            else f"<td>{_num(row.get(c, ''))}</td>"
            for c in columns
        )
        + "</tr>"
        for row in rows
    )
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(report: Report, media_width: int = 160) -> str:
    """The report as one HTML document."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(report.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(report.title)}</h1>",
    ]
    if report.summary:
        parts.append(f"<p>{html.escape(report.summary)}</p>")
    parts.append("<h2>Metrics</h2>")
    rows = [
        {
            "metric": m.name,
            "value": m.value,
            "interval": "–" if math.isnan(m.low) else f"[{m.low:.4g}, {m.high:.4g}]",
            "N": m.n,
            "extractor": m.extractor,
            "note": m.note,
        }
        for m in report.metrics
    ]
    parts.append(_table(rows, table_id="metrics"))
    if report.notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
        parts.append(f'<ul class="notes">{items}</ul>')
    if report.grids:
        parts.append("<h2>Samples (fixed seeds)</h2>")
        for prompt, cells in report.grids:
            parts.append(f"<h3>{html.escape(prompt)}</h3>")
            cells_html = "".join(
                _media(Media(m.data, m.mime, label), media_width) for label, m in cells
            )
            parts.append(f'<div class="grid">{cells_html}</div>')
    if report.reconstructions:
        parts.append("<h2>VAE reconstructions (original | reconstruction | 4 × |error|)</h2>")
        parts.append(
            '<div class="grid">'
            + "".join(_media(m, 3 * media_width) for m in report.reconstructions)
            + "</div>"
        )
    if report.figures:
        parts.append("<h2>Figures</h2>")
        parts.append(
            '<div class="grid">' + "".join(_media(m, 480) for m in report.figures) + "</div>"
        )
    for title, table in report.tables:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(_table(table))
    if report.lineage:
        parts.append("<h2>Lineage</h2>")
        parts.append(_table([{"what": k, "value": v} for k, v in report.lineage.items()]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write(report: Report, path: Path) -> Path:
    """Write :func:`render` of ``report`` to ``path`` (UTF-8)."""
    Path(path).write_text(render(report), encoding="utf-8")
    return Path(path)


__all__ = ["Media", "MetricRow", "Report", "render", "write"]
