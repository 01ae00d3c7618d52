"""webassets: Data Docs' CDN files copied into the site, URLs rewritten relative to each page."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from components.core import webassets

BOOTSTRAP_JS = "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js"
FONT_AWESOME = "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css"
LOGO = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png?d=2026"


def sri(path) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(path.read_bytes()).digest()).decode()


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "docs"
    (root / "static" / "images").mkdir(parents=True)
    (root / "static" / "images" / "logo-long.png").write_bytes(b"png")
    (root / "static" / "images" / "favicon.ico").write_bytes(b"ico")
    page = root / "validations" / "suite" / "run" / "page.html"
    page.parent.mkdir(parents=True)
    bootstrap = webassets.node_modules() / "bootstrap/dist/js/bootstrap.min.js"
    page.write_text(
        f'<link rel="stylesheet" href="{FONT_AWESOME}">'
        f'<script src="{BOOTSTRAP_JS}" integrity="{sri(bootstrap)}" crossorigin="anonymous">'
        "</script>"
        '<link rel="shortcut icon" href="../../static/images/favicon.ico"/>'
        f"<img src=\"{LOGO}\"><style>a {{ background: url('{LOGO}') }}</style>"
        '<a href="https://greatexpectations.io">GX</a>'
    )
    (root / "index.html").write_text(f'<script src="{BOOTSTRAP_JS}"></script>')
    return root


def test_the_site_loads_its_own_copies(site):
    copied = webassets.vendor_assets(site)
    page = (site / "validations/suite/run/page.html").read_text()
    up = "../../../"
    assert f'src="{up}static/vendor/bootstrap@4.3.1/dist/js/bootstrap.min.js"' in page
    assert "integrity" not in page and "crossorigin" not in page  # file:// cannot do CORS
    fa = "static/vendor/@fortawesome/fontawesome-free@6.6.0"
    assert f'href="{up}{fa}/css/all.min.css"' in page
    assert f'src="{up}static/images/logo-long.png"' in page
    assert f"url('{up}static/images/logo-long.png')" in page
    assert f'href="{up}static/images/favicon.ico"' in page  # GX's one-level-short path mended
    assert '<a href="https://greatexpectations.io">' in page  # links are left alone
    index = (site / "index.html").read_text()
    assert 'src="static/vendor/bootstrap@4.3.1/dist/js/bootstrap.min.js"' in index
    assert f"{fa}/webfonts/fa-solid-900.woff2" in copied
    assert all((site / f).is_file() for f in copied)
    assert not list(site.rglob("*.ttf"))  # woff2 is enough
    assert webassets.vendor_assets(site) == []  # idempotent: nothing left to rewrite or copy
    assert (site / "index.html").read_text() == index


def test_an_integrity_mismatch_fails(site):
    page = site / "validations/suite/run/page.html"
    page.write_text(f'<script src="{BOOTSTRAP_JS}" integrity="sha384-AAAA"></script>')
    with pytest.raises(webassets.WebAssetsError, match="does not match the integrity"):
        webassets.vendor_assets(site)


def test_a_url_without_a_local_copy_fails(site):
    (site / "new.html").write_text('<script src="https://cdn.example.com/lib.js"></script>')
    with pytest.raises(
        webassets.WebAssetsError, match=r"cdn\.example\.com/lib\.js \(in new\.html\)"
    ):
        webassets.vendor_assets(site)


def test_missing_assets_name_the_file_and_make_setup(site, tmp_path, monkeypatch):
    monkeypatch.setenv(webassets.NODE_MODULES_ENV, str(tmp_path / "nothing"))
    with pytest.raises(webassets.WebAssetsError, match=r"nothing/.*package\.json.*make setup"):
        webassets.vendor_assets(site)


def test_every_asset_is_pinned_in_package_json_and_installed():
    package = json.loads((webassets.ROOT / "package.json").read_text())["dependencies"]
    lock = json.loads((webassets.ROOT / "package-lock.json").read_text())["packages"]
    for url, asset in webassets.CDN_ASSETS.items():
        assert package[asset.package].endswith(asset.version), (url, asset)
        assert lock[f"node_modules/{asset.package}"]["version"] == asset.version, (url, asset)
        for file in (asset.file, *asset.extra):
            assert (webassets.node_modules() / asset.package / file).is_file(), (url, file)
