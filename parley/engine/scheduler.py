"""Continuous batching: requests join and leave the running batch at every step.

    with Scheduler(model, kv_budget_bytes=256 * 2**20) as scheduler:
        handle = scheduler.submit([1, 2, 3], SamplingParams(max_tokens=16))
        for event in handle:                  # blocks; or `async for event in handle.events()`
            print(event.token, event.finish_reason)

One background thread runs steps. A step (1) drops cancelled requests, (2) admits waiting
requests in FIFO order while a batch slot and the pages their whole answer may need are
free (so an admitted request always finishes; the head of the queue is never overtaken,
so nobody starves), (3) computes one token of every decoding request plus at most
`prefill_budget` prompt tokens of requests still in prefill (oldest first), each prompt
cut into chunks of `prefill_chunk` tokens (on AMX tiles, where the cut changes no bits,
wherever the budget ends): a long prompt is prefilled over several steps
while the running streams keep decoding in the same steps, so it delays each of their
tokens by at most one step's prompt tokens, and a burst of short prompts is prefilled
several to a step (a step's weights are read once for all its rows), (4) samples and
delivers events (each event loop gets a step's events in one wake-up), and finished
requests leave at once, releasing their pages. The decode rows run on the C step of
engine/fast.py over the pages where the model allows it, and the prompt chunks on the
model's forward over a packed row (on AMX tiles, the C layers take the chunks and the
decode rows together); without the C step, one forward takes both. Full pages are named
by their tokens and stay cached after their request ends (engine/cache.py), so the next
turn of a conversation skips prefill of the history it shares with the last one.

Each request samples with its own `Sampler`, so its tokens are those `Engine.generate`
gives for its prompt alone (same seed, same tokens).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence

import torch

from parley.engine.cache import PagedKVCache
from parley.engine.cache import Sequence as CachedSequence
from parley.engine.engine import Engine, Event, PromptError
from parley.engine.sampling import Sampler, SamplingParams
from parley.model.transformer import Transformer

__all__ = ["Scheduler", "RequestHandle", "QueueFull", "SchedulerError", "Event", "PromptError"]


class SchedulerError(RuntimeError):
    """The scheduler is closed or broke, or cannot ever serve a request (see the message)."""


class QueueFull(SchedulerError):
    """Too many requests are waiting: try again after `retry_after_seconds`."""

    def __init__(self, waiting: int, retry_after_seconds: float):
        super().__init__(f"{waiting} requests are already waiting: retry in {retry_after_seconds:.0f} s")
        self.retry_after_seconds = retry_after_seconds


class RequestHandle:
    """One submitted request. Iterate it (blocking) or `async for` over `events()`, not
    both; abandoning either iteration cancels the request. Event.index is always 0 (one
    prompt), as in `Engine.stream([prompt], ...)`; the last event carries `finish_reason`:
    "stop", "length", or "cancelled". If the scheduler itself fails, iteration raises
    SchedulerError (finish_reason "error", the cause in `error`)."""

    def __init__(self, request_id: int, prompt: list[int], params: SamplingParams, wake):
        self.id, self.prompt, self.params = request_id, prompt, params
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._wake = wake
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._finished = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until the request ends (without consuming its events); its finish_reason."""
        self._finished.wait(timeout)
        return self.finish_reason

    def cancel(self) -> None:
        """Stop generating; the request's pages are freed at the next step. Safe from any thread."""
        if not self.done:
            self.cancelled = True
            self._wake()

    def _deliver(self, item: Event | BaseException, outbox: dict | None = None) -> None:
        """Called by the scheduler thread: hand an event (or the error that ended it) over.
        With an `outbox`, an event for an async consumer waits there (by event loop) until the
        step ends and `_post` hands the step's events to each loop in one wake-up."""
        if isinstance(item, Event):
            if item.token is not None:
                self.tokens.append(item.token)
            if item.finish_reason:
                self.finish_reason = item.finish_reason
        else:
            self.error, self.finish_reason = item, "error"
        if self.finish_reason:
            self._finished.set()
        with self._lock:
            if self._loop is None:
                self._queue.put(item)
                return
        if outbox is not None:
            outbox.setdefault(self._loop, []).append((self, item))
            return
        try:
            self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody listens any more
            self.cancel()

    @staticmethod
    def _post(outbox: dict) -> None:
        """Hand each event loop its events of the step, in order, with one call: one wake-up of
        the loop a step instead of one a stream."""
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody listens to its requests any more
                for handle, _ in items:
                    handle.cancel()

    @staticmethod
    def _unwrap(item: Event | BaseException) -> Event:
        if isinstance(item, BaseException):
            raise SchedulerError(f"the scheduler failed: {item}") from item
        return item

    def delivered(self) -> list[Event]:
        """The events delivered so far and not taken yet, without waiting: for a caller that
        runs the steps itself (engine/stepped.py)."""
        events = []
        while not self._queue.empty():
            events.append(self._unwrap(self._queue.get()))
        return events

    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                event = self._unwrap(self._queue.get())
                yield event
                if event.finish_reason:
                    return
        finally:
            self.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """The events, awaited on the caller's event loop (no thread per request)."""
        with self._lock:
            self._loop, self._aqueue = asyncio.get_running_loop(), asyncio.Queue()
            while not self._queue.empty():  # events delivered before we attached
                self._aqueue.put_nowait(self._queue.get())
        try:
            while True:
                event = self._unwrap(await self._aqueue.get())
                yield event
                if event.finish_reason:
                    return
        finally:
            self.cancel()


def _put_all(items: list) -> None:
    for handle, item in items:
        handle._aqueue.put_nowait(item)


class _Request:
    """The scheduler's side of a request."""

    def __init__(self, handle: RequestHandle, budget: int, pages: int, device):
        self.handle, self.budget, self.pages_needed = handle, budget, pages
        self.seq = CachedSequence(tokens=list(handle.prompt))
        self.sampler = Sampler(handle.params, device)
        self.generated = 0

    @property
    def prefilling(self) -> bool:
        return self.seq.length < len(self.handle.prompt)


class Scheduler:
    """Serves many requests at once over one model (see the module docstring).

    kv_budget_bytes sizes the paged cache (default: room for max_batch full contexts,
    at most 1 GiB); page_size is in tokens; max_waiting bounds the queue (`QueueFull`
    beyond it); prefill_chunk is the most tokens of one prompt that one step prefills (not on
    AMX tiles: there a prompt may take a whole step), and prefill_budget (>= prefill_chunk)
    the most prompt tokens of all prompts. With `fast`
    (the default), decode rows run on the C step of engine/fast.py where the model allows
    (then pages are fp32, as Engine's cache, or bf16 on AMX tiles); prompt chunks run on
    the model's forward, or with AMX on the C layers, together with that step's decode rows.
    """

    def __init__(self, model: Transformer, *, max_batch: int = 64, kv_budget_bytes: int | None = None,
                 page_size: int = 16, max_waiting: int = 256, prefill_chunk: int = 256,
                 prefill_budget: int = 512, fast: bool = True, threads: int | None = None):
        for name, value in (("max_batch", max_batch), ("max_waiting", max_waiting), ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise SchedulerError(f"{name} must be >= 1 (got {value})")
        if prefill_budget < prefill_chunk:  # else a whole chunk would never fit in a step
            raise SchedulerError(f"prefill_budget must be >= prefill_chunk ({prefill_chunk}), got {prefill_budget}")
        self.engine = Engine(model, fast=fast)  # prompt checks, the C decode step and the cache dtype
        self.model, self.fast, cfg = model.eval(), self.engine.fast, model.config
        dtype, device = self.engine.cache_dtype, model.lm_head.weight.device
        if kv_budget_bytes is None:
            per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
            kv_budget_bytes = min(2**30, max_batch * cfg.max_position_embeddings * per_token)
        self.cache = PagedKVCache(cfg, kv_budget_bytes, page_size, dtype, device)
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self.prefill_budget = prefill_budget
        self.device = device
        # torch threads of the scheduler's own thread (None: as inherited). Each OS thread that runs
        # multi-threaded OpenMP work keeps its own team, and with two teams on a 2-core machine libgomp
        # stops spinning, which halves decode speed (RESULTS.md): a server runs every other thread
        # single-threaded and gives the scheduler all of them.
        self.threads = threads
        self._lock = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._failure: BaseException | None = None
        self._step_seconds = 0.0  # moving average, for Retry-After estimates
        self._stats = dict(steps=0, prefill_tokens=0, reused_tokens=0, decode_tokens=0, finished=0, cancelled=0,
                           peak_running=0)

    # -- lifecycle
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="parley-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; requests still waiting or running end with "cancelled"."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        for request in list(self._waiting) + self._running:
            self._finish(request, Event(0, None, "cancelled"))
        self._waiting.clear()
        self._running.clear()

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the request API
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestHandle:
        """Queue a request (thread-safe). Raises PromptError for a prompt the model cannot
        take or whose prompt and max_tokens could never fit in the KV budget, QueueFull
        when max_waiting requests wait already, SchedulerError when closed or broken."""
        prompt = [int(t) for t in prompt_ids]
        self.engine.check_prompt(prompt)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams (got {type(params).__name__})")
        budget = min(params.max_tokens, self.engine.context_length - len(prompt))
        pages = self.cache.pages_for(len(prompt) + budget)
        with self._lock:
            if self._closing or self._failure is not None:
                raise SchedulerError("the scheduler is closed" if self._closing else
                                     f"the scheduler failed: {self._failure}")
            if pages > self.cache.num_pages:
                raise PromptError(f"the prompt and max_tokens need {pages} pages of {self.cache.page_size} "
                                     f"tokens but the KV budget holds {self.cache.num_pages}: lower max_tokens "
                                     "or raise kv_budget_bytes")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(len(self._waiting), self._retry_after())
            handle = RequestHandle(next(self._ids), prompt, params, self._wake)
            self._waiting.append(_Request(handle, budget, pages, self.device))
            self._lock.notify_all()
        return handle

    def stats(self) -> dict:
        """Counters: requests running/waiting (and the most ever running at once), pages
        (total, used, free, cached), tokens prefilled, reused from the prefix cache, decoded;
        steps; requests finished, cancelled."""
        c = self.cache
        with self._lock:
            return dict(self._stats, running=len(self._running), waiting=len(self._waiting),
                        pages_total=c.num_pages, pages_used=c.pages_used, pages_free=c.pages_free,
                        pages_cached=c.pages_cached, page_size=c.page_size)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _retry_after(self) -> float:
        """Roughly when a slot frees: the shortest remaining answer at the recent step rate."""
        remaining = min((r.budget - r.generated for r in self._running), default=1)
        return max(1.0, remaining * self._step_seconds)

    # -- the loop
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            while True:
                with self._lock:
                    while not self._closing and not self._running and not self._waiting:
                        self._lock.wait()
                    if self._closing:
                        return
                started = time.perf_counter()
                self._step()
                self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - started)
        except BaseException as e:  # fail every request loudly rather than leave clients hanging
            with self._lock:
                self._failure = e
                doomed = list(self._waiting) + self._running
                self._waiting.clear()
                self._running.clear()
            for request in doomed:
                request.handle._deliver(e)

    def _finish(self, request: _Request, event: Event, outbox: dict | None = None) -> None:
        self.cache.release(request.seq)
        request.handle._deliver(event, outbox)

    def drop_cancelled(self) -> None:
        """End cancelled requests now, waiting or running, and free their pages (each step
        starts with this; a caller stepping by hand may call it alone, computing nothing)."""
        with self._lock:
            for request in [r for r in self._waiting if r.handle.cancelled]:
                self._waiting.remove(request)
                self._stats["cancelled"] += 1
                request.handle._deliver(Event(0, None, "cancelled"))
        for request in [r for r in self._running if r.handle.cancelled]:
            self._running.remove(request)
            self._stats["cancelled"] += 1
            self._finish(request, Event(0, None, "cancelled"))

    def _admit(self) -> None:
        """FIFO: admit the head of the queue while a slot and its pages are free."""
        with self._lock:
            while self._waiting and len(self._running) < self.max_batch:
                request = self._waiting[0]
                seq = request.seq
                # reuse whole cached pages, but always compute the last prompt token (its logits)
                reused = self.cache.match(seq, len(seq.tokens) - 1)
                if request.pages_needed - len(seq.pages) > self.cache.pages_free:
                    self.cache.release(seq)
                    seq.length, seq.hashes = 0, []
                    return
                seq.pages += self.cache.allocate(request.pages_needed - len(seq.pages))
                self._stats["reused_tokens"] += reused
                self._running.append(self._waiting.popleft())
                self._stats["peak_running"] = max(self._stats["peak_running"], len(self._running))

    def step(self) -> None:
        """Run one step in the caller's thread: for tests and tools that drive the
        scheduler by hand instead of calling start()."""
        if self._thread is not None:
            raise SchedulerError("the scheduler's own thread runs the steps: do not call step() after start()")
        self._step()

    @torch.inference_mode()
    def _step(self) -> None:
        self.drop_cancelled()
        self._admit()
        decodes, prompts, chunk = [], [], self.prefill_budget
        # on AMX tiles every row's arithmetic, attention included, is the same wherever its
        # prompt is cut (tests/test_tiles.py), so a prompt takes whatever is left of the budget
        any_cut = self.fast is not None and self.fast.amx
        for request in self._running:
            seq = request.seq
            if not request.prefilling:
                decodes.append((request, 1))
            elif chunk > 0 and any_cut:
                n = min(chunk, len(seq.tokens) - seq.length)
                prompts.append((request, n))
                chunk -= n
            elif chunk > 0:
                # else a prompt is cut into the same chunks however it is batched (prefill_chunk
                # tokens from its start; flash attention's sums depend on the cut), so its numbers,
                # and its answer, are those it gets alone: one that does not fit in what is left of
                # this step's budget starts the next step
                n = min(self.prefill_chunk, len(seq.tokens) - seq.length)
                if n > chunk:
                    chunk = 0  # later prompts wait too: prompts are prefilled in arrival order
                    continue
                prompts.append((request, n))
                chunk -= n
        feeds = decodes + prompts
        if not feeds:
            return
        if self.fast and self.fast.amx:  # every row through the C layers
            # one-token feeds (decode rows, and prompts down to their last token) go first
            chunks = [feed for feed in prompts if feed[1] > 1]
            feeds = decodes + [feed for feed in prompts if feed[1] == 1] + chunks
            batch = self.cache.batch([(r.seq, n) for r, n in feeds])
            logits = self.fast.step_rows(batch) if chunks else self.fast.step_paged(batch)
        elif self.fast:  # decode rows on the C step, prompt chunks on the model's forward
            logits = [self.fast.step_paged(self.cache.batch([(r.seq, 1) for r, _ in decodes]))] if decodes else []
            logits += [self._forward(prompts)] if prompts else []
            logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        else:
            logits = self._forward(feeds)
        self._stats["steps"] += 1
        self._stats["prefill_tokens"] += sum(n for _, n in prompts)
        choosing = []  # prompt done: these rows choose a token
        for row, (request, _) in enumerate(feeds):
            self.cache.publish(request.seq)
            if request.seq.length == len(request.seq.tokens):
                choosing.append((row, request))
        # plain greedy rows take one argmax for all of them, not one call each
        plain = [row for row, r in choosing if r.handle.params.greedy and r.handle.params.repetition_penalty == 1.0]
        best = {}
        if plain and self.fast and logits.dtype == torch.float32 and logits.is_contiguous():
            best = dict(zip(plain, self.fast.argmax(logits, plain)))
        elif plain:
            best = dict(zip(plain, logits[plain].argmax(-1).tolist()))
        outbox: dict = {}
        try:
            for row, request in choosing:
                self._sample(request, logits[row], best.get(row), outbox)
        finally:
            RequestHandle._post(outbox)

    def _forward(self, feeds: list[tuple[_Request, int]]) -> torch.Tensor:
        batch = self.cache.batch([(r.seq, n) for r, n in feeds])
        return self.model(torch.tensor([batch.ids], device=self.device), batch)[0]

    def _sample(self, request: _Request, logits: torch.Tensor, token: int | None, outbox: dict) -> None:
        """Deliver the request's next token: `token` when chosen already, else its sampler's pick."""
        params, seq = request.handle.params, request.seq
        if token is None:
            context = torch.as_tensor(seq.tokens, device=self.device) if params.repetition_penalty != 1.0 else _EMPTY
            token = request.sampler(logits, context)
        if token in params.stop_ids:
            event = Event(0, None, "stop")
        else:
            request.generated += 1
            self._stats["decode_tokens"] += 1
            seq.tokens.append(token)
            event = Event(0, token, "length" if request.generated >= request.budget else None)
        if event.finish_reason:
            self._running.remove(request)
            self._stats["finished"] += 1
            self._finish(request, event, outbox)
        else:
            request.handle._deliver(event, outbox)


_EMPTY = torch.zeros(0, dtype=torch.long)
