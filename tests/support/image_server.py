"""A real HTTP server in the test process, serving image files and the failures a real server
can produce: 404, a connection closed mid-transfer, a slow trickle, a required Authorization."""

import threading
import time
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
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(server: ImageServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            server.requests.append(self.path)
            mode, _, name = self.path.split("?", 1)[0].lstrip("/").partition("/")
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
            if mode in ("files", "auth"):
                self.wfile.write(data)
                return
            self.send_error(404, "unknown mode")

    return Handler


@contextmanager
def serve(root: Path) -> Iterator[ImageServer]:
    server = ImageServer(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    httpd.daemon_threads = True
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
