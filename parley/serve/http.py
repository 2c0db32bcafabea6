"""The HTTP protocol `parley serve` runs under uvicorn: uvicorn's httptools protocol with two bounds it lacks.

    uvicorn.run(app, http=BoundedHttp)     # or uvicorn.Config(app, http=BoundedHttp)

uvicorn's parser takes a request's head (its request line and headers) without limit of size or time: one client
could grow the server's memory with a header of hundreds of megabytes, or hold thousands of connections open by
never finishing their heads, until the process ran out of file descriptors and nobody could connect. Here a head
may take at most HEAD_BYTES bytes (then 431 and the connection closes) and HEAD_SECONDS seconds from its first byte
(or from the connection, for the first request; then 408 and the connection closes). Bodies are bounded by the app
(parley/serve/app.py); idle keep-alive connections by uvicorn's own timeout.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_BYTES = 64 * 1024
HEAD_SECONDS = 20.0


class BoundedHttp(HttpToolsProtocol):
    head_bytes, head_seconds = HEAD_BYTES, HEAD_SECONDS

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_read = 0
        self._start_head()

    def _start_head(self) -> None:
        self._head_read = 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_seconds, self._refuse, 408, "Request Timeout",
                                                    "the request's headers took too long to arrive")

    def _end_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, reason: str, message: str) -> None:
        self._end_head()
        if self.transport.is_closing():
            return
        body = message.encode("ascii")
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, reason.encode("ascii"), len(body), body))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        in_head = self._head_timer is not None
        super().data_received(data)
        if in_head and self._head_timer is not None and not self.transport.is_closing():
            self._head_read += len(data)  # a chunk that also ended the head is not counted: its head was whole
            if self._head_read > self.head_bytes:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request's line and headers are over {self.head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head()  # a keep-alive connection's next request: its own bounds

    def on_headers_complete(self) -> None:
        self._end_head()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_head()
        super().connection_lost(exc)
