"""Look at a page the way a user's browser does: headless Chromium (the Debian package, installed
by ``make browser``, which ``make test`` runs), with the network cut off.

:func:`open_page` loads a file (or URL), waits for its images and videos, and returns a
:class:`PageReport`: console errors, every script/stylesheet/image/video and whether it loaded,
the title, and :meth:`PageReport.js` to ask the live page anything. The report owns the browser:
use it as a context manager (or call :meth:`PageReport.close`)::

    with open_page(site / "index.html", screenshot=ARTIFACTS / "index.png") as page:
        assert page.ok, page.problems()
        assert page.js("return document.querySelectorAll('table tr').length") > 3

``offline=True`` (the default) makes the page see no network at all, as on a machine without
internet: DevTools' offline emulation for ``file://`` pages (every http(s) load fails, even to
localhost), and for an ``http://localhost`` page a dead proxy for everything that is not loopback.
So a CDN reference left in a page fails here as it would for a user offline.

Videos count as loaded at ``readyState >= 2`` (HAVE_CURRENT_DATA: a frame can be shown); a
``<video preload="none">`` never gets there by itself. Images count as loaded when complete with
``naturalWidth > 0``. A video the browser cannot decode logs no console error: it only shows in
``videos`` (``error`` 4, MEDIA_ERR_SRC_NOT_SUPPORTED) and ``failed``.

What Debian's Chromium 156 plays from a ``file://`` page (measured with files written by PyAV
18.1, ``preload`` auto, metadata or unset alike): H.264 mp4 (``libx264``: High, Constrained
Baseline and High 4:4:4 all reach readyState 4; ``components.core.media.encode_video``'s default
mp4 too), VP9 in webm or mp4 (``libvpx-vp9``; ``encode_video(... .webm)``), VP8 webm and AV1
(``libsvtav1``) in mp4 or webm; images: animated WebP (``libwebp_anim``), GIF and APNG. Not
played: MPEG-4 Part 2 (``mpeg4``, media.py's fallback when FFmpeg lacks libx264) and HEVC
(``libx265``); ``canPlayType`` says "" for both and for Theora.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)
MAX_SCREENSHOT_HEIGHT = 16000  # px; a full-page screenshot is cut there
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
    "--hide-scrollbars",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    "--no-first-run",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--force-color-profile=srgb",
    "--lang=en-US",
)
OFFLINE_ARGS = ("--proxy-server=http://127.0.0.1:9",)  # non-loopback requests: nowhere to go

# Runs before any of the page's scripts: records every subresource's load / error event. They do
# not bubble, but pass through document in the capture phase (load events never reach window).
_RECORDER = """
(() => {
  const loads = (window.__tessera_loads = []);
  const record = (ok) => (event) => {
    const el = event.target;
    if (!el || !el.tagName) return;
    const parent = el.parentElement;
    loads.push({
      tag: el.tagName.toLowerCase(), ok: ok,
      url: el.currentSrc || el.src || el.href || (parent && parent.currentSrc) || "",
    });
  };
  document.addEventListener("load", record(true), true);
  document.addEventListener("error", record(false), true);
})();
"""

_MEDIA_SETTLED = """
const videos = [...document.querySelectorAll("video")];
const images = [...document.images];
return document.readyState === "complete"
  && images.every((i) => i.complete)
  && videos.every((v) => v.readyState >= 2 || v.error !== null || v.networkState === 3
                         || v.preload === "none");
"""

_COLLECT = """
const abs = (u) => { try { return new URL(u, document.baseURI).href; } catch (e) { return u; } };
const loads = window.__tessera_loads || [];
const failedUrls = new Set(loads.filter((l) => !l.ok).map((l) => l.url));
const resources = [];
for (const s of document.querySelectorAll("script[src]")) {
  const url = abs(s.getAttribute("src"));
  resources.push({tag: "script", url: url,
                  ok: !failedUrls.has(url) && loads.some((l) => l.ok && l.url === url)});
}
for (const l of document.querySelectorAll("link[rel~='stylesheet'][href]")) {
  let rules = null;
  try { rules = l.sheet ? l.sheet.cssRules.length : null; } catch (e) { rules = -1; }
  resources.push({tag: "stylesheet", url: abs(l.getAttribute("href")),
                  ok: l.sheet !== null && !failedUrls.has(abs(l.getAttribute("href"))), rules: rules});
}
const images = [...document.images].map((i) => ({
  tag: "img", url: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0,
  width: i.naturalWidth, height: i.naturalHeight}));
const videos = [...document.querySelectorAll("video")].map((v) => ({
  tag: "video", url: v.currentSrc || v.src ||
    [...v.querySelectorAll("source")].map((s) => s.src).join(" "),
  ok: v.readyState >= 2 && v.error === null, ready_state: v.readyState,
  network_state: v.networkState, error: v.error ? v.error.code : null,
  error_message: v.error ? v.error.message : null,
  width: v.videoWidth, height: v.videoHeight, duration: v.duration || null,
  preload: v.preload}));
return {title: document.title, url: location.href, resources: resources, images: images,
        videos: videos, events: loads};
"""


class BrowserMissing(RuntimeError):
    """Chromium or chromedriver is not installed."""


@dataclass
class Resource:
    """One script, stylesheet, image or video of the page and whether it loaded."""

    tag: str
    url: str
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return self.url.startswith("file://")


@dataclass
class MediaCount:
    total: int
    loaded: int
    broken: list[Resource]

    @property
    def all_loaded(self) -> bool:
        return self.loaded == self.total


@dataclass
class PageReport:
    """What a page did in Chromium. ``console_errors`` holds the SEVERE browser-log messages
    (uncaught exceptions, failed loads, CORS/integrity refusals); ``failed`` every subresource
    that did not load (error events, stylesheets without a sheet, broken images, videos without a
    frame). The browser stays open for :meth:`js` until :meth:`close`."""

    url: str
    title: str
    console: list[dict[str, Any]]
    console_errors: list[str]
    scripts: list[Resource]
    stylesheets: list[Resource]
    images: MediaCount
    videos: MediaCount
    failed: list[str]
    screenshot: Path | None
    driver: Any = field(repr=False, default=None)

    @property
    def ok(self) -> bool:
        """No console error, nothing failed, every image and video loaded."""
        return (
            not self.console_errors
            and not self.failed
            and self.images.all_loaded
            and self.videos.all_loaded
            and all(r.ok for r in self.scripts + self.stylesheets)
        )

    def problems(self) -> str:
        """A readable list of everything that went wrong (for assertion messages)."""
        lines = [f"page {self.url} ({self.title!r}):"]
        lines += [f"  console: {m}" for m in self.console_errors]
        lines += [f"  failed: {u}" for u in self.failed]
        for r in self.scripts + self.stylesheets + self.images.broken + self.videos.broken:
            if not r.ok:
                lines.append(f"  not loaded: {r.tag} {r.url} {r.detail or ''}".rstrip())
        if self.screenshot:
            lines.append(f"  screenshot: {self.screenshot}")
        return "\n".join(lines)

    def js(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body: ``return ...``) in the live page."""
        if self.driver is None:
            raise RuntimeError("the browser of this report is closed")
        return self.driver.execute_script(script, *args)

    def close(self) -> None:
        if self.driver is not None:
            with contextlib.suppress(Exception):
                self.driver.quit()
            self.driver = None

    def __enter__(self) -> PageReport:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def require_browser() -> None:
    """Fail (never skip) with the fix when Chromium or chromedriver is missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        raise BrowserMissing(
            f"{' and '.join(missing)} not found: run `make browser` (or `make test`, which runs "
            "it) to install the Debian packages chromium and chromium-driver"
        )


def start_browser(*, offline: bool = True):
    """A headless Chromium webdriver with the fixed window size (and no internet if offline)."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in CHROMIUM_ARGS + (OFFLINE_ARGS if offline else ()):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _RECORDER})
    return driver


def page_url(path_or_url: Path | str) -> str:
    text = str(path_or_url)
    if urlparse(text).scheme in ("http", "https", "file", "data", "about"):
        return text
    path = Path(path_or_url).resolve()
    if not path.exists():
        raise FileNotFoundError(path)
    return path.as_uri()


def open_page(
    path_or_url: Path | str,
    *,
    offline: bool = True,
    screenshot: Path | None = None,
    wait_s: float = 15.0,
    full_page: bool = True,
) -> PageReport:
    """Load ``path_or_url`` in headless Chromium and report on it (see the module doc).

    Waits up to ``wait_s`` for the page's load event, then for every image to complete and every
    video to reach HAVE_CURRENT_DATA or an error. ``screenshot``: save a PNG there (the whole
    page when ``full_page``). The returned report keeps the browser open for ``report.js``.
    """
    url = page_url(path_or_url)
    driver = start_browser(offline=offline)
    report = None
    try:
        if offline and not urlparse(url).scheme.startswith("http"):
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd(
                "Network.emulateNetworkConditions",
                {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
            )
        driver.set_page_load_timeout(max(wait_s, 1.0))
        driver.get(url)
        deadline = time.monotonic() + wait_s
        while not driver.execute_script(_MEDIA_SETTLED) and time.monotonic() < deadline:
            time.sleep(0.1)
        report = _report(driver, screenshot, full_page)
        return report
    finally:
        if report is None:
            with contextlib.suppress(Exception):
                driver.quit()


def _report(driver, screenshot: Path | None, full_page: bool) -> PageReport:
    state = driver.execute_script(_COLLECT)
    console = driver.get_log("browser")
    errors = [e["message"] for e in console if e.get("level") == "SEVERE"]

    def resource(item: dict[str, Any]) -> Resource:
        detail = {k: v for k, v in item.items() if k not in ("tag", "url", "ok")}
        return Resource(item["tag"], item["url"], bool(item["ok"]), detail)

    resources = [resource(r) for r in state["resources"]]
    images = [resource(r) for r in state["images"]]
    videos = [resource(r) for r in state["videos"]]
    failed = sorted({e["url"] for e in state["events"] if not e["ok"]})
    failed += sorted(
        {r.url for r in resources + images + videos if not r.ok and r.url not in failed}
    )
    if screenshot is not None:
        screenshot = Path(screenshot)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(_screenshot(driver, full_page))
    report = PageReport(
        url=state["url"],
        title=state["title"],
        console=console,
        console_errors=errors,
        scripts=[r for r in resources if r.tag == "script"],
        stylesheets=[r for r in resources if r.tag == "stylesheet"],
        images=MediaCount(len(images), sum(r.ok for r in images), [r for r in images if not r.ok]),
        videos=MediaCount(len(videos), sum(r.ok for r in videos), [r for r in videos if not r.ok]),
        failed=failed,
        screenshot=screenshot,
        driver=driver,
    )
    weakref.finalize(report, _quit, driver)  # a report never closed still ends its browser
    return report


def _quit(driver) -> None:
    with contextlib.suppress(Exception):
        driver.quit()


def _screenshot(driver, full_page: bool) -> bytes:
    """A PNG of the viewport, or of the whole page: the viewport is stretched to the page's
    height for the shot (so fixed headers and footers sit where a reader sees them), then reset."""
    if not full_page:
        return base64.b64decode(driver.execute_cdp_cmd("Page.captureScreenshot", {})["data"])
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    height = min(max(int(size["height"]), WINDOW[1]), MAX_SCREENSHOT_HEIGHT)
    metrics = {"width": WINDOW[0], "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return base64.b64decode(shot["data"])


def describe(report: PageReport) -> str:
    """The report as JSON text (for logs and artifacts), without the live driver."""
    return json.dumps(
        {
            "url": report.url,
            "title": report.title,
            "console_errors": report.console_errors,
            "failed": report.failed,
            "scripts": [r.__dict__ for r in report.scripts],
            "stylesheets": [r.__dict__ for r in report.stylesheets],
            "images": {"total": report.images.total, "loaded": report.images.loaded},
            "videos": {"total": report.videos.total, "loaded": report.videos.loaded},
            "screenshot": str(report.screenshot) if report.screenshot else None,
        },
        indent=1,
        default=str,
    )
