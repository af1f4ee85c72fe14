"""A quiet loopback HTTP server for the synthetic source and tests, with routes that fail like the
real web."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Iterator


HOSTILE_S = 300  # how long the never-ending routes last at most


class _Handler(http.server.BaseHTTPRequestHandler):
    """/img/F the image; /missing/F 404; /html/F an HTML page; /truncated/F half the JPEG, then a
    dropped link; /redirect/<quoted url> a 302 to that url; /drip/N a promised image whose bytes
    come one every `drip_s` seconds; /dripheaders/N the same for its headers; /endless/N bytes
    without a length, for ever."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: img2dataset hits us thousands of times
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        parts = self.path.strip("/").split("/")
        root: Path = self.server.root  # type: ignore[attr-defined]
        if len(parts) == 2 and parts[0] == "redirect":  # /redirect/<quoted url>: 302 to that url
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(parts[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if len(parts) == 2 and parts[0] in ("drip", "dripheaders", "endless"):
            return self._hostile(parts[0])
        if len(parts) != 2 or parts[0] not in ("img", "html", "truncated") or "/" in parts[1] or ".." in parts[1]:
            return self._send(404, b"not found", "text/plain")
        route, name = parts
        slow = getattr(self.server, "slow", None)
        if slow is not None and slow.is_set():  # a test holds the fetch mid-download
            time.sleep(self.server.delay_s)  # type: ignore[attr-defined]
        if route == "html":
            return self._send(200, b"<!doctype html><html><body><h1>Moved</h1></body></html>", "text/html")
        path = root / name
        if not path.is_file():
            return self._send(404, b"not found", "text/plain")
        body = path.read_bytes()
        if route == "truncated":
            # promise the whole file, send half, hang up: the client reads a truncated JPEG
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            return None
        return self._send(200, body, "image/jpeg")

    def _hostile(self, route: str) -> None:
        """Answers that never finish, as a slow-loris or broken server gives them; they stop when
        the client hangs up (or after HOSTILE_S) so a server thread never outlives a test for long.
        """
        drip_s = getattr(self.server, "drip_s", 2.0)
        self.close_connection = True
        if route == "dripheaders":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(int(HOSTILE_S / drip_s)):
                self.wfile.write(b"a")
                self.wfile.flush()
                time.sleep(drip_s)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if route == "drip":
            self.send_header("Content-Length", "100000")
        self.send_header("Connection", "close")
        self.end_headers()
        deadline = time.monotonic() + HOSTILE_S
        while time.monotonic() < deadline:
            self.wfile.write(b"\xff" if route == "drip" else b"\xff" * 65536)
            self.wfile.flush()
            if route == "drip":
                time.sleep(drip_s)

    def _send(self, code: int, body: bytes, ctype: str):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request, client_address):  # clients that hang up early are normal here
        pass


@contextlib.contextmanager
def serve(root: Path, slow: threading.Event | None = None, delay_s: float = 2.0,
          drip_s: float = 2.0) -> Iterator[str]:
    """Serve root's files on 127.0.0.1 (a free port) for the duration; yields the base url.

    While `slow` is set every image/html answer waits `delay_s` first (tests interrupt a fetch
    mid-download); the drip routes send a byte every `drip_s` seconds.
    """
    server = _Server(("127.0.0.1", 0), _Handler)
    server.root = Path(root)  # type: ignore[attr-defined]
    server.slow, server.delay_s, server.drip_s = slow, delay_s, drip_s  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
