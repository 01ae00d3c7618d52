"""Pages as a user sees them: the validate step's Data Docs opened in headless Chromium with the
network cut off (every stylesheet and script from the site itself, Bootstrap applied, the
results tables filled), and the browser helper shown to catch what breaks a page.

Chromium and chromedriver come from ``make browser`` (``make test`` runs it); without them these
tests fail, never skip. Screenshots are kept in ``var/test-artifacts/browser/``.
"""

from __future__ import annotations

import functools
import http.server
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from components.core import media, webassets
from components.core.config import TesseraConfig
from components.steps import validate
from tests.components.steps.test_validate import make_rows, write_manifest
from tests.testing_utils import browser
from tests.testing_utils.browser import open_page

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("browser")]
ARTIFACTS = Path(__file__).resolve().parents[2] / "var" / "test-artifacts" / "browser"
CDN_SCRIPT = "https://cdn.jsdelivr.net/npm/vega@5"


@pytest.fixture(scope="module", autouse=True)
def chromium():
    try:
        browser.require_browser()
    except browser.BrowserMissing as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def data_docs(tmp_path_factory) -> Path:
    """The Data Docs site of a real validate run on the step test's 40-row manifest."""
    root = tmp_path_factory.mktemp("browser-validate")
    validate.run(TesseraConfig(), root / "work", write_manifest(root, make_rows()))
    return root / "work" / "data_docs"


def pages(site: Path) -> dict[str, Path]:
    (validation,) = (site / "validations").rglob("*.html")
    return {
        "index": site / "index.html",
        "validation": validation,
        "suite": site / "expectations" / f"{validate.SUITE_NAME}.html",
    }


def screenshot(name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    print(f"screenshot: {path}")
    return path


# --------------------------------------------------------------------------- Data Docs offline


@pytest.mark.parametrize("name", ["index", "validation", "suite"])
def test_data_docs_load_everything_from_the_site(data_docs, name):
    page_path = pages(data_docs)[name]
    remote = re.findall(
        r"<(?:script|link|img)\b[^>]*(?:src|href)=.https?://[^\"']*", page_path.read_text()
    )
    assert remote == []
    with open_page(page_path, screenshot=screenshot(f"data_docs_{name}")) as page:
        (ARTIFACTS / f"data_docs_{name}.json").write_text(browser.describe(page))
        assert page.ok, page.problems()
        assert page.console_errors == [] and page.failed == [], page.problems()
        assert len(page.scripts) >= 9 and len(page.stylesheets) >= 6
        site = data_docs.resolve().as_uri() + "/"
        for resource in page.scripts + page.stylesheets:
            assert resource.ok and resource.url.startswith(site + webassets.VENDOR_DIR), resource
        assert page.images.total >= 1 and page.images.all_loaded, page.problems()  # GX's logo
        # Bootstrap's CSS and JS applied: utility classes and the table plugin
        assert page.js("return getComputedStyle(document.querySelector('.d-flex')).display") == (
            "flex"
        )
        assert page.js("return getComputedStyle(document.querySelector('nav.navbar')).position")
        assert page.js("return getComputedStyle(document.body).fontFamily").startswith(
            "-apple-system"
        )
        libraries = "return [typeof jQuery, typeof jQuery.fn.bootstrapTable, typeof vegaEmbed]"
        assert page.js(libraries) == ["function"] * 3
        assert page.js("return document.querySelectorAll('.bootstrap-table').length") >= 1


def test_index_lists_the_validation_run(data_docs):
    with open_page(pages(data_docs)["index"]) as page:
        rows = page.js(
            "return [...document.querySelectorAll('.bootstrap-table table tbody tr')]"
            ".map((r) => r.innerText)"
        )
        # the Validation Results table (one run) and the Expectation Suites table (one suite)
        assert len(rows) == 2 and all(validate.SUITE_NAME in r for r in rows), rows
        assert "UTC" in rows[0] and "manifest" in rows[0], rows
        link = page.js("return document.querySelector('.bootstrap-table tbody a').href")
        assert link.endswith(".html") and Path(link.removeprefix("file://")).is_file()


def test_validation_page_tables_are_filled(data_docs):
    with open_page(pages(data_docs)["validation"]) as page:
        assert page.ok, page.problems()
        stats = page.js(
            "return [...document.querySelectorAll('table')].map((t) => t.innerText)"
            ".find((t) => t.includes('Evaluated Expectations'))"
        )
        assert "16" in stats and "100%" in stats, stats
        results = page.js(
            "return [...document.querySelectorAll('.bootstrap-table table tbody tr')]"
            ".map((r) => r.innerText)"
        )
        assert len(results) >= 16, results  # one row per expectation
        assert any("values must be greater than or equal to" in r for r in results), results
        # the status icons: Font Awesome's solid font, from the site's own webfonts
        icon = page.js(
            "const i = document.querySelector('.fa-check-circle');"
            "return [getComputedStyle(i, '::before').content, getComputedStyle(i).fontFamily]"
        )
        assert icon == ['"\uf058"', '"Font Awesome 6 Free"'], icon
        fonts = page.js(
            "return [...document.fonts].filter((f) => f.status === 'loaded').map((f) => f.family)"
        )
        assert "Font Awesome 6 Free" in fonts, fonts


# --------------------------------------------------------------------------- the helper fails


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser-page")
    frames = np.zeros((12, 48, 64, 3), np.uint8)
    frames[:, :, :32, 0] = 255
    media.encode_video(root / "clip.mp4", frames, 12)
    media.encode_video(root / "clip_mpeg4.mp4", frames, 12, codec="mpeg4")  # no browser plays it
    media.encode_image(root / "still.png", frames[0])
    (root / "ok.js").write_text("window.okScript = true;")
    return root


@pytest.fixture(scope="module")
def local_server(media_dir):
    """An HTTP server on loopback serving ``media_dir`` (offline mode must cut it off too)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def write_page(directory: Path, name: str, body: str, head: str = "") -> Path:
    path = directory / name
    path.write_text(
        f"<!doctype html><html><head><title>{name}</title>{head}</head><body>{body}</body></html>"
    )
    return path


def test_a_sound_page_passes(media_dir):
    page_path = write_page(
        media_dir,
        "good.html",
        '<img src="still.png"><video src="clip.mp4" muted preload="auto"></video>'
        "<table><tr><td>metric</td><td>0.5</td></tr></table>",
        head='<script src="ok.js"></script>',
    )
    with open_page(page_path, screenshot=screenshot("helper_good_page")) as page:
        assert page.ok, page.problems()
        assert page.title == "good.html"
        assert (page.images.total, page.images.loaded) == (1, 1)
        assert (page.videos.total, page.videos.loaded) == (1, 1)
        assert page.js("return window.okScript") is True
        assert page.js("return document.querySelectorAll('table tr').length") == 1
        assert page.js("return document.querySelector('video').videoWidth") == 64
    assert page.screenshot.stat().st_size > 1000
    with pytest.raises(RuntimeError, match="closed"):
        page.js("return 1")


def test_the_helper_catches_what_breaks_a_page(media_dir, local_server):
    page_path = write_page(
        media_dir,
        "broken.html",
        '<img src="still.png"><img src="missing.png">'
        '<video src="clip.mp4" muted></video><video src="clip_mpeg4.mp4" muted></video>'
        "<script>window.undefinedFunction();</script>",
        head=f'<script src="missing.js"></script><script src="{CDN_SCRIPT}"></script>'
        f'<script src="{local_server}/ok.js"></script><link rel="stylesheet" href="missing.css">',
    )
    with open_page(page_path, screenshot=screenshot("helper_broken_page"), wait_s=10) as page:
        assert not page.ok
        assert (page.images.total, page.images.loaded) == (2, 1)
        assert [Path(r.url).name for r in page.images.broken] == ["missing.png"]
        assert (page.videos.total, page.videos.loaded) == (2, 1)
        (bad_video,) = page.videos.broken
        assert bad_video.url.endswith("clip_mpeg4.mp4") and bad_video.detail["error"] == 4
        failed = {Path(u).name if u.startswith("file:") else u for u in page.failed}
        assert {"missing.png", "missing.js", "missing.css", "clip_mpeg4.mp4"} <= failed, failed
        assert {CDN_SCRIPT, f"{local_server}/ok.js"} <= failed, (
            failed
        )  # no network, not even loopback
        assert page.js("return window.okScript") is None
        errors = "\n".join(page.console_errors)
        assert "missing.js" in errors and "undefinedFunction" in errors, errors
        assert "ERR_INTERNET_DISCONNECTED" in errors, errors
        not_loaded = {r.url for r in page.scripts + page.stylesheets if not r.ok}
        assert f"{local_server}/ok.js" in not_loaded and CDN_SCRIPT in not_loaded
        assert "missing.css" in page.problems()


def test_online_the_loopback_server_is_reached(media_dir, local_server):
    """The control for the offline check above: the same script loads with the network on."""
    page_path = write_page(
        media_dir, "served.html", "", head=f'<script src="{local_server}/ok.js"></script>'
    )
    with open_page(page_path, offline=False) as page:
        assert page.ok, page.problems()
        assert page.js("return window.okScript") is True


def test_a_served_page_reaches_loopback_but_not_the_internet(media_dir, local_server):
    write_page(
        media_dir,
        "served.html",
        "",
        head=f'<script src="ok.js"></script><script src="{CDN_SCRIPT}"></script>',
    )
    with open_page(f"{local_server}/served.html") as page:
        assert page.js("return window.okScript") is True
        assert page.failed == [CDN_SCRIPT], page.problems()
        assert "ERR_PROXY_CONNECTION_FAILED" in "\n".join(page.console_errors)


def test_missing_chromedriver_fails_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "CHROMEDRIVER", tmp_path / "chromedriver")
    with pytest.raises(browser.BrowserMissing, match=r"make browser.*make test"):
        open_page(tmp_path)
