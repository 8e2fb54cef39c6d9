"""``GET /dashboard/``: the usage dashboard, a static page whose scripts call the gateway's own API.

The page and its files load without a key (``PUBLIC``); the key is typed into the page and every
data call goes through the authenticated API like any client's. ``/dashboard`` redirects to
``dashboard/`` (relative, so that a path prefix in front of the gateway is kept): the page's URLs
are relative to that trailing slash. Every answer forbids scripts, styles and connections from
anywhere but the gateway itself, inline ones included, and content-type sniffing.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, Router, get
from litestar.status_codes import HTTP_308_PERMANENT_REDIRECT

from gateway.api.auth import PUBLIC
from gateway.api.dashboard.assets import PAGE, dashboard_assets
from gateway.errors import ApiError

DASHBOARD_PATH = "/dashboard"
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    # Small files: revalidating each time keeps a page and its scripts from different versions apart.
    "cache-control": "no-cache",
}


def _asset_response(path: str) -> Response[bytes]:
    asset = dashboard_assets().get(path)
    if asset is None:
        raise ApiError(404, "The dashboard has no such file.", code="not_found")
    return Response(asset.body, media_type=asset.media_type, headers=SECURITY_HEADERS)


@get("/", include_in_schema=False)
async def dashboard_page(request: Request[Any, Any, Any]) -> Response[bytes]:
    # Litestar routes "/dashboard" and "/dashboard/" alike and trims the slash from ``path``.
    if not request.scope.get("raw_path", b"/").endswith(b"/"):
        return Response(
            b"",
            status_code=HTTP_308_PERMANENT_REDIRECT,
            media_type="text/plain",
            headers={**SECURITY_HEADERS, "location": "dashboard/"},
        )
    return _asset_response(PAGE)


@get("/static/{asset:path}", include_in_schema=False)
async def dashboard_asset(asset: str) -> Response[bytes]:
    return _asset_response(asset.lstrip("/"))


DASHBOARD_ROUTES = Router(path=DASHBOARD_PATH, route_handlers=[dashboard_page, dashboard_asset], opt={PUBLIC: True})
