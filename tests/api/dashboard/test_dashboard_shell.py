"""The dashboard's static shell: served without a key from the package's own files, with security
headers that allow only the gateway's own scripts and styles, relative URLs only, no markup built
from data, and the vendored chart library pinned with its licence."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.api.dashboard.assets import dashboard_assets
from tests.support.gateways import gateway, scripted_model
from tests.support.live import LiveGateway
from tests.support.paths import REPO_ROOT
from tests.support.usage_data import migrated_sqlite

STATIC = REPO_ROOT / "gateway" / "api" / "dashboard" / "static"
UPLOT_VERSION = "1.6.32"
OWN_SCRIPTS = sorted((STATIC / "js").glob("*.js"))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    url = migrated_sqlite(tmp_path_factory.mktemp("dashboard-shell"))
    with gateway(url, [scripted_model("m")]) as served:
        yield served


@pytest.fixture
def http(live: LiveGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.base_url, timeout=30) as client:
        yield client


def check_security_headers(response: httpx.Response) -> None:
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_the_page_loads_without_a_key_and_the_data_still_needs_one(http: httpx.Client) -> None:
    page = http.get("/dashboard/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == (STATIC / "index.html").read_bytes()
    check_security_headers(page)
    redirect = http.get("/dashboard")
    assert (redirect.status_code, redirect.headers["location"]) == (308, "dashboard/")
    check_security_headers(redirect)
    for path in ("/v1/usage", "/v1/usage/latency", "/v1/usage/budget", "/admin/usage", "/admin/keys"):
        assert http.get(path).status_code == 401, path


@pytest.mark.parametrize("path", sorted(dashboard_assets()))
def test_every_asset_is_served_from_the_package_with_its_type(http: httpx.Client, path: str) -> None:
    response = http.get(f"/dashboard/static/{path}")
    assert response.status_code == 200
    assert response.content == (STATIC / path).read_bytes()
    media = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}[Path(path).suffix]
    assert response.headers["content-type"] == f"{media}; charset=utf-8"
    check_security_headers(response)


def test_the_package_serves_every_script_and_style_of_the_folder() -> None:
    on_disk = {str(p.relative_to(STATIC)) for p in STATIC.rglob("*") if p.suffix in (".js", ".css", ".html")}
    assert set(dashboard_assets()) == on_disk
    assert {"index.html", "js/app.js", "vendor/uplot/uPlot.esm.js", "vendor/uplot/uPlot.min.css"} <= on_disk


@pytest.mark.parametrize(
    "path",
    [
        "nothing.js",
        "../assets.py",
        "..%2Froutes.py",
        "%2e%2e/%2e%2e/routes.py",
        "vendor/uplot/LICENSE",
        "THIRD_PARTY.md",
    ],
)
def test_nothing_else_is_served(http: httpx.Client, path: str) -> None:
    response = http.get(f"/dashboard/static/{path}")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_page_runs_no_inline_code_and_uses_relative_urls_only() -> None:
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts == [(' type="module" src="./static/js/app.js"', "")]
    assert "<style" not in html
    assert not re.search(r"\sstyle=", html)
    assert not re.search(r"\son[a-z]+=", html)
    for url in re.findall(r'(?:src|href|action)="([^"]*)"', html):
        assert url.startswith("./") or url == "data:,", url


@pytest.mark.parametrize("script", OWN_SCRIPTS, ids=[p.name for p in OWN_SCRIPTS])
def test_scripts_build_no_markup_from_strings_and_name_no_absolute_path(script: Path) -> None:
    code = script.read_text()
    for risky in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert risky not in code, risky
    assert not re.search(r"https?://", code)
    assert not re.search(r"""["'`]/(v1|admin|dashboard|static)\b""", code), "an absolute path"
    assert "localStorage" not in code  # the key is kept for the tab only (sessionStorage)
    for module in re.findall(r"""from\s+["']([^"']+)["']""", code):
        assert module.startswith(("./", "../")), module
        assert (script.parent / module).resolve().is_file(), module


def test_the_chart_library_is_pinned_with_its_licence() -> None:
    vendor = STATIC / "vendor" / "uplot"
    assert f"(v{UPLOT_VERSION})" in (vendor / "uPlot.esm.js").read_text()[:400]
    assert "The MIT License" in (vendor / "LICENSE").read_text()
    notes = (STATIC / "THIRD_PARTY.md").read_text()
    assert f"| uPlot | {UPLOT_VERSION} | MIT" in notes


def test_the_dashboard_is_not_part_of_the_api_document(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/dashboard")]
    assert {"/v1/usage/latency", "/v1/usage/budget", "/admin/usage/latency", "/admin/usage/budgets"} <= set(paths)
