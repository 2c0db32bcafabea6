"""A real HTTP server on 127.0.0.1 for tests, serving a table of routes from a thread.

    with serve({"/": Reply(200, b"<p>hi</p>"), "/n": lambda req: Reply(200, req.query["q"][0].encode())}) as site:
        httpx.get(site.url("/"))
        assert site.hits["/"] == 1

A route is a `Reply` or a function of the `Request` (GET or POST) that returns one. A reply's body is bytes
or an iterable of byte chunks (written as they come, so a test can serve a body larger than
any client should read). Responses are HTTP/1.0: one request per connection, the body ends
when the connection closes, so nothing depends on Content-Length unless a reply sets it.
Pass `tls=(cert.pem, key.pem)` to serve https instead.
"""

from __future__ import annotations

import ssl
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Reply:
    status: int
    body: bytes | Iterable[bytes] = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes = b""  # a POST's (read by its Content-Length)


Route = Reply | Callable[[Request], Reply]


@dataclass
class Site:
    base: str
    hits: Counter = field(default_factory=Counter)  # path -> requests served
    requests: list[Request] = field(default_factory=list)

    def url(self, path: str = "/") -> str:
        return self.base + path


@contextmanager
def serve(routes: dict[str, Route], tls: tuple[str, str] | None = None) -> Iterator[Site]:
    """Serve `routes` (path -> route; unknown paths get 404) until the block ends."""
    site = Site("")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0) if self.command == "POST" else 0
            request = Request(parts.path, parse_qs(parts.query), dict(self.headers.items()), self.rfile.read(length))
            with lock:
                site.hits[parts.path] += 1
                site.requests.append(request)
            route = routes.get(parts.path, Reply(404, b"not found", "text/plain"))
            reply = route(request) if callable(route) else route
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                for chunk in [reply.body] if isinstance(reply.body, bytes) else reply.body:
                    self.wfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading (size limit, timeout): that is the point

        do_POST = do_GET  # the route sees the body in request.body

        def log_message(self, format: str, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    site.base = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)  # quick shutdown
    thread.start()
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
