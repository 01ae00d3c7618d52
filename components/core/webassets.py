"""Offline Data Docs: the CSS, JS and fonts that Great Expectations' pages load from CDNs, served
from the site itself.

GX writes its Data Docs with ``<link>``/``<script>`` tags pointing at CDNs (Bootstrap,
bootstrap-table, jQuery, Vega, Font Awesome, ...); without internet the pages show unstyled links
and empty tables. :func:`vendor_assets` copies the few files those tags name from the npm packages
that ``package.json`` pins (installed by ``make setup`` with ``npm ci`` into ``node_modules/``)
into ``<site>/static/vendor/<package>@<version>/...`` and rewrites every such URL, in every HTML
and CSS file of the site, to a path relative to that file. GX's own logo, which its pages load
from S3, points at the copy GX already writes to ``static/images/``, and a relative link to the
site's ``static/`` that GX got one level too shallow (the favicon of a validation page) is mended.

:data:`CDN_ASSETS` maps each URL to its package file. A URL that is not there makes
:func:`vendor_assets` fail naming the URL (a GX upgrade that adds one must add it here and to
``package.json``); a missing package file fails naming the file and ``make setup``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from components.core.config import Environment

ROOT = Path(__file__).resolve().parents[2]  # the repository (package.json, node_modules/)
NODE_MODULES_ENV = "TESSERA_NODE_MODULES"  # overrides ROOT / "node_modules"
VENDOR_DIR = "static/vendor"
IMAGES_DIR = "static/images"


class WebAssetsError(RuntimeError):
    """A Data Docs asset is missing locally, or a page names a URL with no local copy."""


@dataclass(frozen=True)
class Asset:
    """One file of an npm package: ``package`` is the directory under ``node_modules`` (an npm
    alias where the pages use two versions of one package), ``version`` the version the CDN URL
    names (checked against the installed ``package.json``), ``file`` the path in the package and
    ``extra`` the files it loads in turn (Font Awesome's fonts)."""

    package: str
    version: str
    file: str
    extra: tuple[str, ...] = ()


_FA_FONTS = tuple(  # woff2 only: Chromium/Firefox/Safari take the first format they read
    f"webfonts/{name}.woff2"
    for name in ("fa-brands-400", "fa-regular-400", "fa-solid-900", "fa-v4compatibility")
)
_BT = "dist/extensions/filter-control/bootstrap-table-filter-control"

CDN_ASSETS: dict[str, Asset] = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": Asset(
        "bootstrap", "4.3.1", "dist/css/bootstrap.min.css"
    ),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": Asset(
        "bootstrap", "4.3.1", "dist/js/bootstrap.min.js"
    ),
    # the minified build of the same release (153 kB instead of 883 kB)
    "https://cdn.jsdelivr.net/npm/@forevolve/bootstrap-dark@1.1.0/dist/css/bootstrap-prefers-dark.css": Asset(
        "@forevolve/bootstrap-dark", "1.1.0", "dist/css/bootstrap-prefers-dark.min.css"
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.css": Asset(
        "bootstrap-table", "1.19.1", "dist/bootstrap-table.min.css"
    ),
    "https://unpkg.com/bootstrap-table@1.19.1/dist/bootstrap-table.min.js": Asset(
        "bootstrap-table", "1.19.1", "dist/bootstrap-table.min.js"
    ),
    f"https://unpkg.com/bootstrap-table@1.19.1/{_BT}.min.js": Asset(
        "bootstrap-table", "1.19.1", f"{_BT}.min.js"
    ),
    f"https://unpkg.com/bootstrap-table@1.19.0/{_BT}.css": Asset(
        "bootstrap-table-1.19.0", "1.19.0", f"{_BT}.css"
    ),
    f"https://unpkg.com/bootstrap-table@1.19.0/{_BT}.min.css": Asset(
        "bootstrap-table-1.19.0", "1.19.0", f"{_BT}.min.css"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": Asset(
        "bootstrap-datepicker", "1.9.0", "dist/css/bootstrap-datepicker.min.css"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": Asset(
        "bootstrap-datepicker", "1.9.0", "dist/js/bootstrap-datepicker.min.js"
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": Asset(
        "@fortawesome/fontawesome-free", "6.6.0", "css/all.min.css", _FA_FONTS
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": Asset(
        "popper.js-1.12.9", "1.12.9", "dist/umd/popper.min.js"
    ),
    "https://code.jquery.com/jquery-3.7.1.min.js": Asset("jquery", "3.7.1", "dist/jquery.min.js"),
    # jsDelivr serves a major-version URL as the newest release of that major (package.json pins it)
    "https://cdn.jsdelivr.net/npm/vega@5": Asset("vega", "5.33.1", "build/vega.min.js"),
    "https://cdn.jsdelivr.net/npm/vega-lite@5": Asset(
        "vega-lite", "5.23.0", "build/vega-lite.min.js"
    ),
    "https://cdn.jsdelivr.net/npm/vega-embed@6": Asset(
        "vega-embed", "6.29.0", "build/vega-embed.min.js"
    ),
}

# GX's logo, loaded from S3 (with a ?d= cache buster); GX writes logo-long.png into the site. The
# dark-mode navbar logo has no local copy: it falls back to the same image.
_GX_S3 = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/"
GX_IMAGES = {
    f"{_GX_S3}logo-long.png": "logo-long.png",
    f"{_GX_S3}full_logo_dark.png": "logo-long.png",
}

_TAG = re.compile(r"<(?:link|script|img|source|video|audio|iframe)\b[^>]*>", re.IGNORECASE)
_TAG_URL = re.compile(r"""\b(href|src)\s*=\s*(["'])(https?:)?//([^"']+)\2""", re.IGNORECASE)
_CSS_URL = re.compile(r"""url\(\s*(["']?)(https?:)?//([^"')]+)\1\s*\)""", re.IGNORECASE)
_INTEGRITY = re.compile(r"""\s+integrity\s*=\s*(["'])([^"']*)\1""", re.IGNORECASE)
_CROSSORIGIN = re.compile(r"""\s+crossorigin(\s*=\s*(["'])[^"']*\2)?""", re.IGNORECASE)


def node_modules() -> Path:
    """Where ``npm ci`` installed ``package.json``'s packages (``$TESSERA_NODE_MODULES`` wins)."""
    return Environment.read().node_modules or ROOT / "node_modules"


def vendor_assets(site_dir: Path | str) -> list[str]:
    """Make the Data Docs site ``site_dir`` load nothing from the network (see the module doc).

    Returns the files it vendored, relative to ``site_dir``. Idempotent: a site already rewritten
    has no CDN URL left, keeps its files, and the call returns ``[]``.
    """
    site = Path(site_dir)
    pages = sorted(p for p in site.rglob("*.html") if VENDOR_DIR not in p.as_posix())
    styles = sorted(
        p for p in site.rglob("*.css") if not p.relative_to(site).as_posix().startswith(VENDOR_DIR)
    )
    used: dict[str, Path] = {}  # url -> the local file under site
    unknown: list[str] = []

    def local(url: str, where: Path) -> Path | None:
        url = "https:" + url if url.startswith("//") else url
        if url in CDN_ASSETS:
            if url not in used:
                used[url] = _copy(CDN_ASSETS[url], site)
            return used[url]
        base = url.split("?", 1)[0]
        if base in GX_IMAGES:
            return site / IMAGES_DIR / GX_IMAGES[base]
        unknown.append(f"{url} (in {where.relative_to(site)})")
        return None

    for path in pages:
        text = path.read_text(encoding="utf-8")
        new = _TAG.sub(lambda m, p=path: _rewrite_tag(m.group(0), p, local), text)
        new = _rewrite_css(new, path, local)
        if new != text:
            path.write_text(new, encoding="utf-8")
    for path in styles:
        text = path.read_text(encoding="utf-8")
        new = _rewrite_css(text, path, local)
        if new != text:
            path.write_text(new, encoding="utf-8")
    if unknown:
        raise WebAssetsError(
            "the Data Docs load files with no local copy, so they would break offline:\n  "
            + "\n  ".join(sorted(set(unknown)))
            + "\nAdd each to CDN_ASSETS in components/core/webassets.py and its package to "
            "package.json (then `npm install --package-lock-only` and `make setup`)."
        )
    copied = {f for url in used for f in _files(CDN_ASSETS[url])}
    return sorted(copied)


def _rewrite_tag(tag: str, page: Path, local) -> str:
    match = _TAG_URL.search(tag)
    if not match:
        return _mend_static_link(tag, page)
    target = local(f"{match.group(3) or ''}//{match.group(4)}", page)
    if target is None:
        return tag
    integrity = _INTEGRITY.search(tag)
    if integrity:  # a file:// page cannot fetch with CORS, so SRI is checked here, then dropped
        _check_integrity(target, integrity.group(2), match.group(0))
        tag = _INTEGRITY.sub("", tag)
        tag = _CROSSORIGIN.sub("", tag)
        match = _TAG_URL.search(tag)
    quote = match.group(2)
    attribute = f"{match.group(1)}={quote}{_relative(target, page)}{quote}"
    return tag[: match.start()] + attribute + tag[match.end() :]


_RELATIVE_STATIC = re.compile(r"""\b(href|src)\s*=\s*(["'])((?:\.\./|\./)*)static/([^"'?#]+)\2""")


def _mend_static_link(tag: str, page: Path) -> str:
    """Point a relative ``.../static/x`` that misses (GX counts a validation page's depth one
    short for its favicon) at the site's ``static/x``, found in the nearest parent folder."""
    match = _RELATIVE_STATIC.search(tag)
    if not match or (page.parent / match.group(3) / "static" / match.group(4)).exists():
        return tag
    for parent in page.parents:
        if (parent / "static" / match.group(4)).is_file():
            target = parent / "static" / match.group(4)
            quote = match.group(2)
            attribute = f"{match.group(1)}={quote}{_relative(target, page)}{quote}"
            return tag[: match.start()] + attribute + tag[match.end() :]
    return tag


def _rewrite_css(text: str, where: Path, local) -> str:
    def replace(m: re.Match) -> str:
        target = local(f"{m.group(2) or ''}//{m.group(3)}", where)
        return m.group(0) if target is None else f"url('{_relative(target, where)}')"

    return _CSS_URL.sub(replace, text)


def _relative(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target, page.parent)).as_posix()


def _vendored(asset: Asset, file: str) -> str:
    return f"{VENDOR_DIR}/{_installed(asset)['name']}@{asset.version}/{file}"


def _files(asset: Asset) -> list[str]:
    return [_vendored(asset, f) for f in (asset.file, *asset.extra)]


def _installed(asset: Asset) -> dict:
    """The installed package's package.json, checked for the pinned version."""
    meta_path = node_modules() / asset.package / "package.json"
    if not meta_path.is_file():
        raise WebAssetsError(
            f"missing {meta_path}: the Data Docs web assets (npm package {asset.package}) are "
            "not installed; run `make setup` (npm ci from package.json)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("version") != asset.version:
        raise WebAssetsError(
            f"{meta_path} is version {meta.get('version')}, the Data Docs need {asset.version}: "
            "run `make setup` (npm ci from package-lock.json)"
        )
    return meta


def _copy(asset: Asset, site: Path) -> Path:
    """Copy ``asset`` (and its extra files) into ``site``; return the main file's local path."""
    package = node_modules() / asset.package
    _installed(asset)
    for file in (asset.file, *asset.extra):
        source = package / file
        if not source.is_file():
            raise WebAssetsError(
                f"missing {source}: the Data Docs web assets are not installed; run `make setup`"
            )
        dest = site / _vendored(asset, file)
        if not dest.is_file() or dest.stat().st_size != source.stat().st_size:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
    return site / _vendored(asset, asset.file)


def _check_integrity(path: Path, integrity: str, url: str) -> None:
    """``integrity`` is ``sha384-<base64>`` (maybe several, space separated); one must match."""
    for item in integrity.split():
        algorithm, _, expected = item.partition("-")
        if algorithm not in ("sha256", "sha384", "sha512"):
            continue
        digest = base64.b64encode(hashlib.new(algorithm, path.read_bytes()).digest()).decode()
        if digest == expected:
            return
    raise WebAssetsError(
        f"{path} does not match the integrity {integrity!r} the page gives for {url}: the npm "
        "package differs from the CDN's file (check the version pinned in package.json)"
    )
