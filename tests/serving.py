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

from parley.serve.generation import Handle, SerialGenerator


@contextmanager
def serving(app) -> Iterator[str]:
    """The app served by uvicorn on 127.0.0.1 (a free port). The socket listens before the
    thread starts, so clients may connect at once: the kernel queues them until uvicorn runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


class GatedEngine:
    """A real engine whose streams stop after their first `after` events until `gate` is set,
    so a test can act while a request is known to be generating."""

    def __init__(self, engine, after: int = 1):
        self.engine, self.after, self.gate = engine, after, threading.Event()

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    def check_prompt(self, prompt) -> None:
        self.engine.check_prompt(prompt)

    def stream(self, prompts, params):
        events = self.engine.stream(prompts, params)
        try:
            for i, event in enumerate(events):
                if i == self.after:
                    self.gate.wait(timeout=60)
                yield event
        finally:
            events.close()


class RecordingGenerator(SerialGenerator):
    """The serial generator, keeping every handle it gave out so a test can watch them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handles: list[Handle] = []

    def submit(self, prompt_ids, params) -> Handle:
        handle = super().submit(prompt_ids, params)
        self.handles.append(handle)
        return handle
