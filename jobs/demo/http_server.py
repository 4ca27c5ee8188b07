"""A loopback HTTP server for the demo and the tests: serves a folder, plus scripted failures.

The demo serves its generated images on 127.0.0.1 so that ingest runs the real img2dataset
download path offline; the tests add routes that answer with an error status, stall past the
client's timeout, or return bytes that are not an image.
"""
import http.server
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Route:
    status: int = 200
    body: bytes = b""
    delay_s: float = 0.0  # sleep before answering (a stalled server)
    content_type: str = "image/jpeg"
    fail_times: int = 0    # answer `fail_status` to the first fail_times requests (a flaky server)
    fail_status: int = 503


class _Handler(http.server.SimpleHTTPRequestHandler):
    routes: dict[str, Route] = {}
    hits: dict[str, int] = {}
    directory = "."

    def __init__(self, *args):
        super().__init__(*args, directory=self.directory)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        route = self.routes.get(self.path)
        if route is None:
            return super().do_GET()
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        failing = self.hits[self.path] <= route.fail_times
        time.sleep(route.delay_s)
        try:
            self.send_response(route.fail_status if failing else route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", "0" if failing else str(len(route.body)))
            self.end_headers()
            self.wfile.write(b"" if failing else route.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer

    def log_message(self, format, *args):  # noqa: A002
        pass


class LoopbackServer:
    """`with LoopbackServer(folder, routes) as server: server.url("images/0.jpg")`."""

    def __init__(self, directory: str | Path, routes: dict[str, Route] | None = None):
        handler = type("Handler", (_Handler,), {"routes": dict(routes or {}), "hits": {},
                                                 "directory": str(directory)})
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def hits(self) -> dict[str, int]:
        """Requests per scripted route so far."""
        return self._httpd.RequestHandlerClass.hits

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def url(self, path: str) -> str:
        return self.base_url + path.lstrip("/")

    def __enter__(self) -> "LoopbackServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
