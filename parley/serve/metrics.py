"""Counters for /metrics in Prometheus' text format, and the ASGI middleware that feeds them.

    metrics = Metrics()
    app = MetricsMiddleware(app, metrics, limit=lambda path: 1_000_000,   # bytes a body may have
                            authorize=check_key)   # async (scope) -> None, or raises a 401 APIError
    metrics.render(gauges={"parley_queue_depth": 3})   # "# HELP ... # TYPE ... name{..} value"

The middleware is plain ASGI (not Starlette's BaseHTTPMiddleware) so it never buffers a
streamed answer or hides a client's disconnect from the route. It also guards every body:

- a /v1 or /api request that carries a body has its key checked (`authorize`) from the headers
  alone, before any of the body is read: a caller without a valid key cannot make the server
  take in megabytes just to be told 401;
- a body is counted while it streams in, chunked or not: a Content-Length over the limit is a
  413 before anything reads it, and a body that passes the limit while it arrives is a 413 at
  that moment, the rest never read (the answer closes the connection, as does any answer
  sent before its request's body has ended).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Awaitable, Callable

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


KEYED = ("/v1/", "/api/")  # the paths whose routes all take a key


class BodyTooLarge(Exception):
    """Raised to the app by `receive` once a body passes its limit."""


class MetricsMiddleware:
    def __init__(self, app, metrics: Metrics, limit: Callable[[str], int],
                 authorize: Callable[[dict], Awaitable[None]] | None = None):
        self.app, self.metrics, self.limit, self.authorize = app, metrics, limit, authorize

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        limit = self.limit(path)
        too_large = APIError(413, f"the request body is over the {limit} byte limit for {path}; "
                             "send less (split the document, shorten the messages)", code="too_large")
        if not length.isdigit() or int(length) > limit:
            error = too_large if length.isdigit() else APIError(400, "Content-Length is not a number",
                                                                code="invalid_value")
            return await self._refuse(error, scope, receive, send)
        has_body = int(length) > 0 or b"transfer-encoding" in headers
        if has_body and self.authorize is not None and (path + "/").startswith(KEYED):
            try:
                await self.authorize(scope)
            except APIError as error:
                return await self._refuse(error, scope, receive, send)

        status, received, over, started, replaced = 500, 0, False, False, False
        unread = has_body  # a body whose end has not come in yet

        async def receiving():
            nonlocal received, over, unread
            if over:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                unread = message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge
            return message

        async def refuse_body():
            nonlocal status, started, replaced
            status, started, replaced = 413, True, True
            await _closing(too_large)(scope, receive, send)

        async def sending(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                if over:  # the app's own answer to the broken body (a 400, a 500): ours is the 413
                    return await refuse_body()
                status, started = message["status"], True
                if unread:  # answered before the body ended (a route that needs none of it): never read the rest
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif replaced:
                return  # the rest of the app's answer that was replaced
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except Exception:
            if not over:
                raise
        finally:
            if over and not started:  # the app gave up without answering
                await refuse_body()
            route = scope.get("route")
            self.metrics.request(scope["method"], getattr(route, "path", "unmatched"), status)

    async def _refuse(self, error: APIError, scope, receive, send) -> None:
        """Answer `error` without reading the body; the connection closes, so the rest is never read."""
        await _closing(error)(scope, receive, send)
        self.metrics.request(scope["method"], "unmatched", error.status)


def _closing(error: APIError):
    response = error.response()
    response.headers["connection"] = "close"
    return response
