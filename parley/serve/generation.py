"""Generation for the server, behind one small interface a batching scheduler can replace.

    generator = SerialGenerator(Engine(model), max_pending=32)
    handle = generator.submit(prompt_ids, SamplingParams(max_tokens=64))  # PromptError, QueueFull
    text = TextAssembler(tokenizer, stop=["\\n\\n"])   # parley.engine.text
    async for event in handle.events():        # parley.engine.engine.Event, as they come
        piece = text.push(event)               # text safe to show (stop strings held back)
        if text.finish_reason:
            break
    handle.cancel()                            # no-op once finished; frees the slot otherwise

`Generator` is the contract the routes use: `submit` returns a `Handle` at once (or raises
`PromptError` for a prompt the model cannot take and `QueueFull` when too many requests are
pending), the handle streams the request's events to async code (`events()`) or to a thread
(`for event in handle`), and `handle.cancel()` stops its generation or takes it out of the
queue. `SerialGenerator` runs one request at a time on a worker thread with `Engine.stream`.

`SchedulerGenerator` adapts the continuous-batching `parley.engine.scheduler.Scheduler` (its
handles have the same `events()`, blocking iteration and `cancel()`); `create_app` picks it
by default, and `SerialGenerator` with `engine.max_batch=1` (`parley serve engine.max_batch=1`).
Another generator plugs in the same way: implement `Generator` and pass it as
`create_app(settings, generator=..., tokenizer=...)`.

`EngineView` lets code written against `Engine.stream` (the assistant's respond stage) share
the same generator, so every token the server produces goes through one queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Protocol

from parley.engine.engine import Engine, Event, PromptError
from parley.engine.sampling import SamplingParams


class QueueFull(RuntimeError):
    """Too many requests are waiting: try again after `retry_after` seconds."""

    def __init__(self, pending: int, retry_after: float):
        super().__init__(f"the server is busy ({pending} requests pending); retry in {retry_after:g} s")
        self.retry_after = retry_after


class GeneratorClosed(RuntimeError):
    """The generator is shutting down and takes no new requests."""


_END = object()  # a handle's last item: generation is over (finished, cancelled or failed)


class Channel:
    """Items from a producer thread to one consumer, async (`async for`) or blocking (`for`).
    `put` an exception to raise it at the consumer; `end()` finishes the iteration."""

    def __init__(self):
        self._items: deque = deque()
        self._ready = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def put(self, item) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify_all()
            wakers = list(self._wakers)
        for loop, event in wakers:
            loop.call_soon_threadsafe(event.set)

    def end(self) -> None:
        self.put(_END)

    async def __aiter__(self) -> AsyncIterator:
        wake = asyncio.Event()
        with self._ready:
            self._wakers.append((asyncio.get_running_loop(), wake))
        while True:
            wake.clear()  # cleared before looking: a put after the look sets it again
            with self._ready:
                items = list(self._items)
                self._items.clear()
            for item in items:
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
            await wake.wait()

    def __iter__(self) -> Iterator:
        while True:
            with self._ready:
                while not self._items:
                    self._ready.wait()
                item = self._items.popleft()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Handle(Channel):
    """One submitted request: its events in order, then the end. Safe to cancel from any thread;
    `for event in handle` works in a thread as `async for event in handle.events()` in a loop."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, owner: Generator | None = None):
        super().__init__()
        self.prompt_ids, self.params, self.owner = prompt_ids, params, owner
        self.cancelled = threading.Event()
        self.started = threading.Event()  # set when generation begins (it has left the queue)
        self.finished = threading.Event()  # set once the generator is done with it, for whatever reason
        self.generated = 0  # tokens produced so far

    def events(self) -> AsyncIterator[Event]:
        return self.__aiter__()

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self.owner is not None:
                self.owner.withdraw(self)
        self.end()


class Generator(Protocol):
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle: ...

    @property
    def pending(self) -> int: ...  # requests waiting to start

    @property
    def active(self) -> int: ...  # requests generating now

    @property
    def context_length(self) -> int: ...  # prompt + completion tokens a request may have

    def close(self) -> None: ...  # stop: fail what waits, cancel what runs


class SerialGenerator:
    """One request at a time, first come first served, on one worker thread. At most
    `max_pending` requests wait; more raise QueueFull, telling the client when to retry."""

    def __init__(self, engine: Engine, max_pending: int = 32, retry_after: float = 1.0):
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1 (got {max_pending})")
        self.engine, self.max_pending, self.retry_after = engine, max_pending, retry_after
        self._waiting: deque[Handle] = deque()
        self._lock = threading.Condition()
        self._running: Handle | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="parley-generator", daemon=True)
        self._thread.start()

    @property
    def context_length(self) -> int:
        return self.engine.context_length

    @property
    def pending(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return int(self._running is not None)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        self.engine.check_prompt(prompt_ids)
        handle = Handle(list(prompt_ids), params, self)
        with self._lock:
            if self._closed:
                raise GeneratorClosed("the server is shutting down; retry against another instance")
            if len(self._waiting) >= self.max_pending:
                raise QueueFull(len(self._waiting), self.retry_after)
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    def withdraw(self, handle: Handle) -> None:
        """Take a cancelled request out of the queue (a running one stops at its next event)."""
        with self._lock:
            if handle in self._waiting:
                self._waiting.remove(handle)
                handle.finished.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            doomed = list(self._waiting)
            self._waiting.clear()
            self._lock.notify()
        for handle in doomed:
            handle.put(GeneratorClosed("the server shut down before this request started"))
            handle.end()
            handle.finished.set()
        running = self._running
        if running is not None:
            running.cancel()
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                handle = self._running = self._waiting.popleft()
                handle.started.set()
            try:
                self._run(handle)
            finally:
                self._running = None
                handle.finished.set()

    def _run(self, handle: Handle) -> None:
        if handle.cancelled.is_set():  # cancelled as it left the queue: not even a prefill
            return
        stream = self.engine.stream([handle.prompt_ids], handle.params)
        try:
            for event in stream:
                if handle.cancelled.is_set():
                    return
                handle.generated += event.token is not None
                handle.put(event)
        except Exception as e:  # the request fails, the worker goes on
            handle.put(e)
        finally:
            stream.close()  # a cancelled request leaves the engine now, not at its max_tokens
            handle.end()


class EngineView:
    """Looks like an `Engine` to code that calls `stream([prompt], params)`, but generates
    through a `Generator`. `overrides` replace sampling fields per request (a turn's
    temperature); `prompt_tokens`/`completion_tokens` count what the last stream used, and
    `handles` (when a list) collects the handles, so their owner can cancel them."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.overrides: dict = {}
        self.handles: list[Handle] | None = None
        self.prompt_tokens = self.completion_tokens = 0

    @property
    def context_length(self) -> int:
        return self.generator.context_length

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[Event]:
        if len(prompts) != 1:
            raise ValueError("EngineView streams one prompt at a time")
        handle = self.generator.submit(list(prompts[0]), dataclasses.replace(params, **self.overrides))
        if self.handles is not None:
            self.handles.append(handle)
        self.prompt_tokens += len(prompts[0])
        try:
            for event in handle:
                self.completion_tokens += event.token is not None
                yield event
        finally:
            handle.cancel()


class SchedulerGenerator:
    """The continuous-batching scheduler as a `Generator`: its errors become ours."""

    def __init__(self, scheduler):
        self.scheduler = scheduler.start()

    @property
    def context_length(self) -> int:
        return self.scheduler.engine.context_length

    @property
    def pending(self) -> int:
        return self.scheduler.stats()["waiting"]

    @property
    def active(self) -> int:
        return self.scheduler.stats()["running"]

    def submit(self, prompt_ids: list[int], params: SamplingParams):
        from parley.engine.scheduler import QueueFull as SchedulerFull
        from parley.engine.scheduler import SchedulerError

        cache, room = self.scheduler.cache, min(params.max_tokens, self.context_length - len(prompt_ids))
        if cache.pages_for(len(prompt_ids) + room) > cache.num_pages:
            raise PromptError(f"the prompt and max_tokens need more KV cache than the server has "
                              f"({cache.num_pages * cache.page_size} tokens): lower max_tokens or shorten the prompt")
        try:
            return self.scheduler.submit(prompt_ids, params)
        except SchedulerFull as e:
            raise QueueFull(self.pending, e.retry_after_seconds) from None
        except SchedulerError as e:  # closed, or broken: not the client's fault
            raise GeneratorClosed(str(e)) from None

    def close(self) -> None:
        self.scheduler.close()
