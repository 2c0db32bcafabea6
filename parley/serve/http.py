"""The HTTP protocol `parley serve` runs under uvicorn: uvicorn's httptools protocol with the bounds it lacks.

    uvicorn.run(app, http=BoundedHttp)     # or uvicorn.Config(app, http=BoundedHttp)
    uvicorn.run(app, http=BoundedHttp.capped(per_client=256, total=2048))   # other connection caps (0: none)

uvicorn's parser takes a request's head (its request line and headers) without limit of size or time: one client
could grow the server's memory with a header of hundreds of megabytes, or hold thousands of connections open by
never finishing their heads, until the process ran out of file descriptors and nobody could connect. Here a head
may take at most HEAD_BYTES bytes (then 431 and the connection closes) and HEAD_SECONDS seconds from its first byte
(or from the connection, for the first request; then 408 and the connection closes). Bodies are bounded by the app
(parley/serve/app.py); idle keep-alive connections by uvicorn's own timeout.

A client can still open connections faster than those seconds close them. So one client address may hold at most
MAX_CONNECTIONS_PER_CLIENT connections at once, and all clients together MAX_CONNECTIONS: one more is answered as it
is made, 429 (that address's cap) or 503 (the server's), with Retry-After, and closed; a closed connection frees its
place at once. Behind a reverse proxy every client has the proxy's address: raise the first cap there
(`parley serve --max-connections-per-client`). Every answer here has the app's error body (parley/serve/errors.py).
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from parley.serve.errors import APIError

HEAD_BYTES = 64 * 1024
HEAD_SECONDS = 20.0
MAX_CONNECTIONS_PER_CLIENT = 64  # parley serve's defaults too (parley/serve/settings.py)
MAX_CONNECTIONS = 512
LINGER_SECONDS = 1.0  # a refused connection's request is read (and dropped) for at most this long
LINGERING = 64  # refused connections read so at once; past them one is closed as soon as it is answered


class BoundedHttp(HttpToolsProtocol):
    head_bytes, head_seconds = HEAD_BYTES, HEAD_SECONDS
    max_connections_per_client, max_connections = MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS

    @classmethod
    def capped(cls, per_client: int, total: int) -> type[BoundedHttp]:
        """This protocol with other connection caps (0: no cap), for uvicorn, which takes a class."""
        return type(cls.__name__, (cls,), {"max_connections_per_client": per_client, "max_connections": total})

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # uvicorn's: adds this connection to the server's set of them
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused, self._linger = False, None  # over a cap: answered at once, then closed (_refuse_at_once)
        self._head_read = 0
        if over := self._over_cap():
            self._refuse_at_once(*over)
        else:
            self._start_head()

    def _over_cap(self) -> tuple[int, str, str, str] | None:
        """(status, reason, code, message) where this connection is one too many, else None."""
        open_ = [c for c in self.connections if not getattr(c, "_refused", False)]  # this one among them
        address = self.client[0] if self.client else None  # None: a Unix socket
        mine = sum(1 for c in open_ if getattr(c, "client", None) and c.client[0] == address)
        if address is not None and 0 < self.max_connections_per_client < mine:
            return (429, "Too Many Requests", "too_many_connections",
                    f"{address} has {mine - 1} connections open to this server, the most one client address may "
                    "hold; reuse them (HTTP keep-alive) or close some, then retry")
        if 0 < self.max_connections < len(open_):
            return (503, "Service Unavailable", "too_many_connections",
                    f"this server has {len(open_) - 1} connections open, the most it takes; retry in a moment")
        return None

    def _refuse_at_once(self, status: int, reason: str, code: str, message: str) -> None:
        """Answer before the request is read, then read and drop what the client sends until it closes (at most
        LINGER_SECONDS): a socket closed with bytes unread makes the kernel reset the connection, and the client
        could lose the answer with it. A client opening connections faster than that could hold as many file
        descriptors as it liked, so past LINGERING such connections the answer is all they get."""
        self._refused = True
        self.transport.write(_answer(status, reason, code, message, retry_after=1))
        lingering = sum(1 for c in self.connections if getattr(c, "_linger", None) is not None)
        if lingering >= LINGERING or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()  # the client reads the answer to its end; its own end then closes this one
        self._linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _start_head(self) -> None:
        self._head_read = 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_seconds, self._refuse, 408, "Request Timeout",
                                                    "request_timeout", "the request's headers took too long to "
                                                    f"arrive (the limit is {self.head_seconds:g} s)")

    def _end_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        self._end_head()
        if self.transport.is_closing():
            return
        self.transport.write(_answer(status, reason, code, message))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what the client sends is dropped
        in_head = self._head_timer is not None
        super().data_received(data)
        if in_head and self._head_timer is not None and not self.transport.is_closing():
            self._head_read += len(data)  # a chunk that also ended the head is not counted: its head was whole
            if self._head_read > self.head_bytes:
                self._refuse(431, "Request Header Fields Too Large", "headers_too_large",
                             f"the request's line and headers are over {self.head_bytes} bytes; send less in them")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head()  # a keep-alive connection's next request: its own bounds

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)


def _answer(status: int, reason: str, code: str, message: str, retry_after: int | None = None) -> bytes:
    """A whole HTTP answer that closes the connection, its body the app's error JSON."""
    body = json.dumps(APIError(status, message, code=code).body()).encode("ascii")
    retry = b"retry-after: %d\r\n" % retry_after if retry_after is not None else b""
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sconnection: close\r\n\r\n%s"
            % (status, reason.encode("ascii"), len(body), retry, body))
