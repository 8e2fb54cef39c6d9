"""A reverse proxy that serves a gateway under a path prefix, stripping it on the way in, as
nginx's ``location /prefix/ { proxy_pass http://gateway/; }`` does.

Requests outside the prefix get a 404 of the proxy's own, so a page that asks for anything by
an absolute path (``/v1/...``) breaks visibly instead of reaching the gateway by luck.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

# Hop-by-hop headers and those httpx recomputes are not forwarded.
_SKIPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


def _handler(prefix: str, upstream: str, seen: list[str]) -> type[BaseHTTPRequestHandler]:
    client = httpx.Client(base_url=upstream, timeout=60, follow_redirects=False)

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _forward(self) -> None:
            seen.append(self.path)
            if not self.path.startswith(prefix + "/"):
                self._answer(404, {"content-type": "text/plain"}, b"not under the proxy's prefix\n")
                return
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _SKIPPED}
            response = client.request(self.command, self.path.removeprefix(prefix), headers=headers, content=body)
            kept = {k: v for k, v in response.headers.items() if k.lower() not in _SKIPPED}
            self._answer(response.status_code, kept, response.content)

        def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _forward

    return Proxy


@contextmanager
def prefix_proxy(upstream: str, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """``(base URL of the proxy, paths it was asked for)``; the gateway is at ``base + prefix``."""
    seen: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(prefix, upstream, seen))
    thread = threading.Thread(target=server.serve_forever, name="prefix-proxy", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
