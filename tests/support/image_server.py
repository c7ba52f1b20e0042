"""A real HTTP server in the test process, serving image files and the failures a real server
can produce: 404, a connection closed mid-transfer, a slow trickle, a required Authorization,
redirects anywhere, a body sent with a content-encoding. It listens on a loopback address of the
test's choice (127.0.0.0/8 only: tests send no traffic elsewhere)."""

import gzip
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class ImageServer:
    root: Path  # files served as /files/<name>
    port: int = 0
    token: str = "Bearer s3cret"
    slow_chunk: int = 64 << 10
    slow_delay: float = 0.25
    host: str = "127.0.0.1"
    requests: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def redirect_to(self, target: str) -> str:
        """A URL of this server that answers 302 to ``target``."""
        return self.url("/redirect/x?" + urllib.parse.urlencode({"to": target}))


def _handler(server: ImageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            server.requests.append(self.path)
            server.headers.append(dict(self.headers.items()))
            mode, _, name = self.path.split("?", 1)[0].lstrip("/").partition("/")
            if mode == "redirect":
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path = server.root / name
            if "/" in name or not name or not path.is_file():
                self.send_error(404, "no such image")
                return
            if mode == "auth" and self.headers.get("Authorization") != server.token:
                self.send_error(401, "authorization required")
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if mode == "encoded":  # what a server does with a compressible file, asked or not
                data = gzip.compress(data)
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if mode == "closing":
                # Announce the whole file, send half, hang up: what a crashed server looks like.
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if mode == "slow":
                for start in range(0, len(data), server.slow_chunk):
                    self.wfile.write(data[start : start + server.slow_chunk])
                    self.wfile.flush()
                    time.sleep(server.slow_delay)
                return
            if mode in ("files", "auth", "encoded"):
                self.wfile.write(data)
                return
            self.send_error(404, "unknown mode")

    return Handler


@contextmanager
def serve(root: Path, host: str = "127.0.0.1") -> Iterator[ImageServer]:
    assert host.startswith("127."), "tests serve on loopback addresses only"
    server = ImageServer(root, host=host)
    httpd = ThreadingHTTPServer((host, 0), _handler(server))
    httpd.daemon_threads = True
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
