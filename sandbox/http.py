"""A small threaded HTTP/1.1 server base for the sandboxes (stdlib only).

Keep-alive, JSON helpers, chunked Server-Sent Events, and the ability to drop a connection
mid-response, which a fault-injecting server needs and a framework would hide.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from email import policy as email_policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class DroppedConnection(Exception):
    """Raised by a handler to cut the connection without a response."""


class SandboxHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__((host, port), handler)
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        """Dropped and reset connections are part of the job (fault injection): stay quiet."""
        import sys

        if not isinstance(sys.exc_info()[1], OSError | ValueError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]

    def start_background(self, name: str) -> None:
        self.thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)


class JSONHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tokenmeter-sandbox/1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet by default
        return

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- request ------------------------------------------------------------------------------
    @property
    def path_only(self) -> str:
        """The request path without query string or trailing slash (praw adds one)."""
        return urlsplit(self.path).path.rstrip("/") or "/"

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def read_json(self) -> Any:
        body = self.read_body()
        return json.loads(body) if body else {}

    def read_form(self) -> tuple[dict[str, str], dict[str, list[bytes]]]:
        """A ``multipart/form-data`` body: text fields, and file parts by field name."""
        raw = self.read_body()
        header = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
        message = BytesParser(policy=email_policy.HTTP).parsebytes(header + raw)
        fields: dict[str, str] = {}
        files: dict[str, list[bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if not isinstance(name, str) or not isinstance(payload, bytes):
                continue
            if part.get_filename() is not None:
                files.setdefault(name.removesuffix("[]"), []).append(payload)
            else:
                fields[name] = payload.decode()
        return fields, files

    # -- response -----------------------------------------------------------------------------
    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def start_sse(self, headers: dict[str, str] | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def send_sse(self, data: Any, event: str | None = None) -> None:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        prefix = f"event: {event}\n" if event else ""
        self.send_chunk(f"{prefix}data: {text}\n\n".encode())

    def end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def drop_connection(self) -> None:
        """Cut the TCP connection now (RST), as a crashed upstream would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.flush()
        self.connection.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        self.connection.close()
