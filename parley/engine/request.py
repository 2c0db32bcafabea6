"""What a caller of the engine holds: a `Request` and its `Event`s, and the engine's errors.

    request = engine.submit(ids, params)        # parley/engine/engine.py
    for event in request:                       # blocking; or `async for event in request.events()`
        print(event.token, event.finish_reason)
    request.cancel()                            # from any thread

Events travel from the thread that steps the engine to the request's reader through a
`Channel` (engine/channel.py): taken blocking (with no engine thread running, the reader steps
the engine itself) or awaited on the reader's event loop (each loop woken once a step).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

from parley.engine.channel import Channel
from parley.engine.sampling import SamplingParams


class EngineError(Exception):
    """Anything the engine refuses or cannot do; the subclasses say which."""


class PromptError(EngineError, ValueError):
    """A prompt the engine cannot take: empty, unknown ids, longer than the context, or with
    max_tokens more KV cache than the engine has. The caller's to fix."""


class QueueFull(EngineError):
    """Too many requests are waiting: try again after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: float):
        super().__init__(f"busy: {waiting} requests are waiting already; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class EngineClosed(EngineError):
    """The engine is shut down and takes no new requests."""


class StepFailed(EngineError):
    """A step failed while this request was in it (the cause chained): a bug or out of memory,
    not the caller's doing. The engine itself goes on."""


@dataclass
class Event:
    """One step of one request: a new token, or the end. `finish_reason` is "stop" (a stop token,
    which is not emitted: token None), "length", "cancelled" or, when a step failed, "error".
    `index` is the prompt's position in `stream(prompts, ...)` (0 for a lone request)."""

    index: int
    token: int | None
    finish_reason: str | None = None


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def params_per_prompt(prompts: Sequence, params: SamplingParams | Sequence[SamplingParams]) -> list[SamplingParams]:
    """One SamplingParams for every prompt: the same for all, or one each."""
    if isinstance(params, SamplingParams):
        return [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    return list(params)


class Request:
    """One submitted request. Iterate it (blocking; with no engine thread running, the
    iteration steps the engine itself) or `async for` over `events()` (needs `start()`), not
    both; leaving either iteration early cancels the request. The last event carries the
    finish_reason; if a step failed, iteration raises StepFailed with the cause chained.
    `engine` is the Engine that made it (this module does not import it: no circle)."""

    def __init__(self, engine, request_id: int, prompt: list[int], params: SamplingParams,
                 index: int = 0, channel: Channel | None = None):
        self.id, self.prompt, self.params, self.index = request_id, prompt, params, index
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._engine = engine
        # (request, event) pairs; one channel is shared by the prompts of one stream()
        self._channel = channel if channel is not None else Channel(gone=self.cancel)
        self._finished = threading.Event()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until the request ends (without consuming its events); its finish_reason."""
        self._finished.wait(timeout)
        return self.finish_reason

    def cancel(self) -> None:
        """Stop generating: a waiting request leaves the queue at once; a running one's pages are
        freed at the next step (or at once by the thread that steps). Safe from any thread, and
        a no-op once the request has ended."""
        if not self.done:
            self.cancelled = True
            self._engine._withdraw(self)

    def _deliver(self, item: Event | BaseException, wakes: dict | None = None) -> None:
        """Called by the stepping thread: hand an event (or the error that ended it) over; with
        `wakes`, the reader's event loop is woken when the step ends (`Channel.wake`)."""
        if isinstance(item, Event):
            if item.token is not None:
                self.tokens.append(item.token)
            if item.finish_reason:
                self.finish_reason = item.finish_reason
        else:
            self.error, self.finish_reason = item, "error"
        if self.finish_reason:
            self._finished.set()
        self._channel.put((self, item), wakes)

    @staticmethod
    def _unwrap(item: Event | BaseException) -> Event:
        if isinstance(item, BaseException):
            raise StepFailed(f"generation failed: {item}") from item
        return item

    def __iter__(self) -> Iterator[Event]:
        try:
            for _, event in self._engine._drain(self._channel, lambda: self.done):
                yield event
                if event.finish_reason:
                    return
        finally:
            self.cancel()
            self._engine._tidy()

    async def events(self) -> AsyncIterator[Event]:
        """The events, awaited on the caller's event loop (no thread per request). Something else
        steps the engine meanwhile: its own thread (`start()`), as in a server."""
        try:
            while True:
                event = self._unwrap((await self._channel.aget())[1])
                yield event
                if event.finish_reason:
                    return
        finally:
            self.cancel()
