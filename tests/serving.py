"""Test helpers for the HTTP server: run an app on a real socket, hold generation at a gate.

    with serving(create_app(settings)) as url:           # uvicorn in a thread, on a free port
        openai.OpenAI(base_url=url + "/v1", api_key=key).models.list()
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from parley.engine.engine import Engine
from parley.serve.http import BoundedHttp


@contextmanager
def serving(app, http=BoundedHttp) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a free port), with the HTTP protocol `parley serve`
    runs (parley/serve/http.py). The socket listens before the thread starts, so clients may
    connect at once: the kernel queues them until uvicorn runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", http=http))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


class GatedEngine(Engine):
    """A real engine that, once `after` tokens are out, holds every step until `gate` is set (so a
    test can act while a request is known to be generating), keeping each request it was given."""

    def __init__(self, model, after: int = 1, **settings):
        super().__init__(model, **settings)
        self.after, self.gate, self.requests = after, threading.Event(), []

    def _submit(self, *args, **kwargs):
        request = super()._submit(*args, **kwargs)
        self.requests.append(request)
        return request

    def _compute(self) -> bool:
        if self.stats()["decode_tokens"] >= self.after:
            self.gate.wait(timeout=60)
        return super()._compute()
