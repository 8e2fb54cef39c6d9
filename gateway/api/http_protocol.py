"""uvicorn's HTTP/1.1 protocol, answering requests it cannot parse in OpenAI's error envelope.

A malformed request line or header never reaches the app; uvicorn answers it with a plain-text
400 of its own. Clients of this gateway read every error as JSON, so that one is JSON too.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def malformed_request_body(reason: str) -> bytes:
    message = f"The request is not valid HTTP/1.1 ({reason.rstrip('.')})."
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_http_request"}
    return json.dumps({"error": error}).encode()


class JsonErrorHttpToolsProtocol(HttpToolsProtocol):
    def send_400_response(self, msg: str) -> None:
        body = malformed_request_body(msg)
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
            ]
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()
