"""What a browser may ask of the server: the Host it names, the Origin of a write, the headers
every answer carries. Plain ASGI, outermost in the app (see create_app), so a refused request
is answered before its key or body is looked at.

    app = BrowserGuard(app, Settings(host="127.0.0.1", allowed_hosts="parley.lan",
                                     allowed_origins="https://tools.example"))

- **Host** (DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 is same-origin with
  the server for the browser, which then sends `Host: evil.example`): an answer only for a
  Host the server is reached by. That is `localhost`, an IP literal the server listens on
  (any, bound to 0.0.0.0 or ::; loopback ones, bound to loopback), the bind name itself,
  the machine's own names when bound to all addresses, and `allowed_hosts` ("*": any).
  A rebinding page always sends its own domain name, never an IP literal, so it is refused
  whatever the bind. Anything else is a 421 (Misdirected Request), as the request was meant
  for another server. A request without Host (HTTP/1.0 tools) passes: browsers always send it.
- **Origin** on every write (POST, PUT, PATCH, DELETE): a browser sends Origin with every
  cross-origin write (a form, a fetch), and with same-origin fetches too; it must name the
  Host above and its port (either scheme: behind a proxy that ends TLS the page is https and
  the server sees http) or be one of `allowed_origins`, else 403.
  Without Origin, `Sec-Fetch-Site: cross-site` or `same-site` (fetch metadata, sent by every
  current browser) is refused too; a request with neither comes from no browser (curl, an
  SDK): it passes, and still needs its key. OWASP's CSRF sheet calls this "verifying origin
  with standard headers" plus fetch metadata; it needs no token, so API clients are unchanged.
- **CORS**: none by default (a browser then lets no other origin read an answer). Origins in
  `allowed_origins` get Access-Control-Allow-Origin and an answered preflight. Open WebUI's
  CORS_ALLOW_ORIGIN and llama.cpp's --cors-origins are the same knob, but default to any
  origin (with a warning at start); a server that may run without keys cannot afford that.
  No cookies are used, so a page can never make the browser attach credentials: a key is a
  bearer header the page's own script must hold.
- **WebSockets** (the live voice route) pass the Host rule and the Origin rule of a write.
- **Headers** on every answer: `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`,
  `Referrer-Policy: no-referrer`, `Cross-Origin-Resource-Policy: same-origin`, and a CSP that
  allows nothing (`default-src 'none'; frame-ancestors 'none'`) unless the route set its own
  (the UI's page: routes_ui.POLICY).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from parley.serve.errors import APIError

WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"same-origin")]
CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
PREFLIGHT = [(b"access-control-allow-methods", b"GET, POST, DELETE"),
             (b"access-control-allow-headers", b"authorization, content-type, x-parley-conversation"),
             (b"access-control-max-age", b"600")]


def names(value: str) -> list[str]:
    """A comma-separated setting as a list of lowercase names ('' -> [])."""
    return [n.strip().lower().rstrip("/") for n in value.split(",") if n.strip()]


def _ip(name: str):
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def split_host(host: str) -> tuple[str, str]:
    """('name', 'port') of a Host header or an origin's netloc ('' for no port); IPv6 unbracketed."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest.removeprefix(":")
    name, _, port = host.partition(":") if host.count(":") <= 1 else (host, "", "")
    return name.rstrip("."), port


class HostPolicy:
    """Which Host names this server answers for (see the module's docstring)."""

    def __init__(self, bind: str, allowed: list[str]):
        self.any = "*" in allowed
        bound = _ip(bind)
        self.every_address = bound is not None and bound.is_unspecified
        self.loopback_only = bind == "localhost" or (bound is not None and bound.is_loopback)
        self.bound = bound
        self.names = {"localhost", *(split_host(h)[0] for h in allowed)}
        if bound is None:
            self.names.add(bind.lower())
        if self.every_address:
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    def allows(self, host: str) -> bool:
        if self.any:
            return True
        name, _ = split_host(host)
        if name in self.names:
            return True
        ip = _ip(name)
        if ip is None:
            return False
        return self.every_address or ip.is_loopback or (not self.loopback_only and ip == self.bound)


class BrowserGuard:
    def __init__(self, app, bind: str, allowed_hosts: str = "", allowed_origins: str = ""):
        self.app, self.hosts = app, HostPolicy(bind, names(allowed_hosts))
        self.origins = set(names(allowed_origins))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send, headers)
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1").strip().lower().rstrip("/")
        if host and not self.hosts.allows(host):
            return await self._refuse(APIError(
                421, f"this server does not answer for the host {split_host(host)[0]!r}; reach it by its address, "
                     "or start it with allowed_hosts=NAME to allow that name", code="invalid_host"), scope, receive, send)
        allowed = origin in self.origins
        if scope["method"] == "OPTIONS" and allowed and b"access-control-request-method" in headers:
            return await self._preflight(origin, send)
        if scope["method"] in WRITES and not allowed:
            refusal = self._write_refusal(origin, host, scope, headers)
            if refusal:
                return await self._refuse(APIError(403, refusal, code="cross_origin"), scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": _secured(message.get("headers", []), origin if allowed else "")}
            await send(message)

        await self.app(scope, receive, sending)

    async def _websocket(self, scope, receive, send, headers) -> None:
        """A WebSocket (the live voice route) passes the same Host and Origin rules as a write:
        a browser sends Origin with every handshake, and a socket can change things (turns)."""
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1").strip().lower().rstrip("/")
        refusal = None
        if host and not self.hosts.allows(host):
            refusal = APIError(421, f"this server does not answer for the host {split_host(host)[0]!r}",
                               code="invalid_host")
        elif origin not in self.origins and (why := self._write_refusal(origin, host, scope, headers)):
            refusal = APIError(403, why, code="cross_origin")
        if refusal is None:
            return await self.app(scope, receive, send)
        if "websocket.http.response" in scope.get("extensions", {}):  # an HTTP answer that says why
            return await self._refuse(refusal, scope, receive, send)
        await send({"type": "websocket.close", "code": 1008, "reason": refusal.code})  # the server answers 403

    @staticmethod
    def _write_refusal(origin: str, host: str, scope, headers) -> str | None:
        """Why a write may not go on (None: it may)."""
        if not origin:
            site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
            if site in ("cross-site", "same-site"):
                return f"a {site} browser request may not change anything here; use this server's own page"
            return None
        # the same host and port; the scheme may differ, as behind a proxy that ends TLS (the page is
        # https, the server sees http): a page on another scheme of the same host is no other site
        parts = urlsplit(origin)
        ours = _with_port(split_host(host), scope.get("scheme", "http")) if host else None
        if parts.scheme in ("http", "https") and _with_port(split_host(parts.netloc), parts.scheme) == ours:
            return None
        return (f"a request from the page at {origin!r} may not change anything here (only this server's own "
                "page may); start the server with allowed_origins=ORIGIN to allow that page")

    async def _preflight(self, origin: str, send) -> None:
        headers = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin"), *PREFLIGHT]
        await send({"type": "http.response.start", "status": 204, "headers": _secured(headers, "")})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _refuse(error: APIError, scope, receive, send) -> None:
        response = error.response()
        response.headers["connection"] = "close"  # the body, if any, is never read

        async def sending(message):
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                message = {**message, "headers": _secured(message.get("headers", []), "")}
            await send(message)

        await response(scope, receive, sending)


def _with_port(host: tuple[str, str], scheme: str) -> tuple[str, str]:
    """A Host without a port names the scheme's default one, which an Origin leaves out too."""
    name, port = host
    return name, "" if port == {"http": "80", "https": "443"}.get(scheme) else port


def _secured(headers: list, origin: str) -> list:
    present = {name.lower() for name, _ in headers}
    out = [*headers, *((n, v) for n, v in HEADERS if n not in present)]
    if CSP[0] not in present:
        out.append(CSP)
    if origin:
        out += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
    return out
