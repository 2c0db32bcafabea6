"""Counters for /metrics in Prometheus' text format, and the ASGI middleware that feeds them.

    metrics = Metrics()
    app = MetricsMiddleware(app, metrics, limit=lambda path: 1_000_000)   # bytes a body may have
    metrics.render(gauges={"parley_queue_depth": 3})   # "# HELP ... # TYPE ... name{..} value"

The middleware is plain ASGI (not Starlette's BaseHTTPMiddleware) so it never buffers a
streamed answer or hides a client's disconnect from the route. It also refuses a body whose
Content-Length is over the limit for its path with a 413, before anything reads it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from parley.serve.errors import APIError


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.tokens = 0
        self.streams = 0  # responses streaming right now

    def request(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self.requests[(method, route, status)] += 1

    def add_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens += n

    def stream_delta(self, n: int) -> None:
        with self._lock:
            self.streams += n

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges` maps a name to (help, value)."""
        with self._lock:
            requests, tokens, streams = sorted(self.requests.items()), self.tokens, self.streams
        lines = ["# HELP parley_requests_total HTTP requests answered, by method, route and status",
                 "# TYPE parley_requests_total counter"]
        for (method, route, status), n in requests:
            lines.append(f'parley_requests_total{{method="{method}",route="{_label(route)}",status="{status}"}} {n}')
        lines += ["# HELP parley_tokens_generated_total tokens generated for completions",
                  "# TYPE parley_tokens_generated_total counter", f"parley_tokens_generated_total {tokens}",
                  "# HELP parley_active_streams responses streaming now", "# TYPE parley_active_streams gauge",
                  f"parley_active_streams {streams}"]
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsMiddleware:
    def __init__(self, app, metrics: Metrics, limit: Callable[[str], int]):
        self.app, self.metrics, self.limit = app, metrics, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        limit = self.limit(scope["path"])
        if not length.isdigit() or int(length) > limit:
            error = APIError(413, f"the request body is over the {limit} byte limit for {scope['path']}; "
                             "send less (split the document, shorten the messages)", code="too_large") \
                if length.isdigit() else APIError(400, "Content-Length is not a number", code="invalid_value")
            await error.response()(scope, receive, send)
            self.metrics.request(scope["method"], "unmatched", error.status)
            return

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            self.metrics.request(scope["method"], getattr(route, "path", "unmatched"), status)
