"""The engine: every request of every front end, batched continuously over a paged KV cache.
Knows nothing about text.

    engine = Engine(model)                                   # or Engine.from_config(model, EngineConfig(...))
    request = engine.submit([1, 2, 3], SamplingParams(max_tokens=16))
    for event in request:                # steps the engine in this thread (no thread of its own yet)
        print(event.token, event.finish_reason)
    [completion] = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=16))

    engine.start()                       # a server: the engine steps on its own thread
    async for event in engine.submit(ids, params).events():   # awaited on the caller's event loop
        ...
    request.cancel()                     # the one way to stop: client gone, barge-in, interrupt
    engine.close()

A step (1) drops cancelled requests, (2) admits waiting requests in FIFO order while a batch
slot and the pages their whole answer may need are free (so an admitted request always
finishes, and the head of the queue is never overtaken), (3) computes one token of every
decoding request plus at most `prefill_budget` prompt tokens of requests still in prefill
(oldest first; a prompt is cut into chunks of `prefill_chunk` tokens, or on the C kernels, where
the cut changes no bits, wherever the budget ends), (4) samples and delivers events (each
event loop gets a step's events in one wake-up); finished requests leave at once and
release their pages. Full pages are named by their tokens and stay cached after their
request ends (engine/cache.py), so the next turn of a conversation prefills only what is new.

Where the rows run: on the C layers of engine/fast.py (AMX tiles, or AVX-512 without them)
when the model and CPU allow, else on the model's paged PyTorch forward, which is also the
path on a GPU. Each request samples with its own `Sampler` and every row's arithmetic is
independent of its batch, so a request's tokens are those it gets alone (`max_batch=1`).

Each request may name a LoRA adapter (`SamplingParams.adapter`, engine/adapters.py): the base
weights' products run once for the whole batch and each row adds its own adapter's low-rank
term (S-LoRA, Punica), on the C kernels and in the PyTorch forward alike; a row's tokens are
still those it gets alone with its adapter, and its cached pages are its adapter's own.

Steps run either on the engine's own thread (`start()`, for servers) or in whichever thread
iterates a request or calls `stream`/`generate` while no thread runs (the terminal,
benchmarks, tests): then all of the model's OpenMP work stays on that one thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from parley.engine.adapters import Adapter, AdapterError, Adapters, applied, row_pointers
from parley.engine.cache import CachedSequence, PagedKVCache
from parley.engine.channel import Channel
from parley.engine.config import EngineConfig
from parley.engine.fast import FastDecoder
from parley.engine.request import (Completion, EngineClosed, EngineError, Event, PromptError, QueueFull, Request,
                                   StepFailed, params_per_prompt)
from parley.engine.sampling import Sampler, SamplingParams
from parley.model.transformer import Transformer

log = logging.getLogger("parley.engine")

__all__ = ["Engine", "Request", "Event", "Completion", "EngineError", "PromptError", "QueueFull", "EngineClosed",
           "StepFailed"]


class _Entry:
    """The engine's side of a request: its sequence in the cache, sampler and budget."""

    def __init__(self, request: Request, budget: int, pages: int, device, adapter: Adapter | None = None):
        self.request, self.budget, self.pages_needed = request, budget, pages
        # an adapter changes every key and value: its pages are its own (adapters.py's key)
        salt = request.params.cache_salt + (f"\0adapter:{adapter.key}" if adapter else "")
        self.seq = CachedSequence(tokens=list(request.prompt), salt=salt.encode())
        self.adapter = adapter  # held (Adapters.acquire) until the request ends
        self.sampler = Sampler(request.params, device)
        self.generated = 0

    @property
    def prefilling(self) -> bool:
        return self.seq.length < len(self.request.prompt)


class Engine:
    """Serves many requests at once over one model (see the module docstring).

    max_batch: requests generating at once (1: one at a time, the batch-1 baseline);
    max_waiting: requests queued beyond those (QueueFull past it); kv_budget_bytes: the paged
    cache (default room for max_batch full contexts, at most 1 GiB); page_size in tokens;
    prefill_chunk: most tokens of one prompt a step prefills (on the PyTorch path; on the C
    kernels a prompt may take a whole step's budget); prefill_budget (>= prefill_chunk): most prompt tokens of
    all prompts in a step; kernels: the CPU path, "auto" | "amx" | "avx512" | "avx2" | "scalar" | "torch"
    (parley/engine/config.py); threads: torch threads of the engine's own thread; adapters: the
    LoRA adapters requests may name (SamplingParams.adapter; engine/adapters.py), or None;
    kv_dtype: "auto" | "bfloat16", the keys and values' precision (parley/engine/config.py).
    """

    def __init__(self, model: Transformer, *, max_batch: int = 64, max_waiting: int = 256,
                 kv_budget_bytes: int | None = None, page_size: int = 16, prefill_chunk: int = 256,
                 prefill_budget: int = 512, kernels: str = "auto", threads: int | None = None,
                 adapters: Adapters | None = None, kv_dtype: str = "auto"):
        try:  # the one place these numbers are checked
            EngineConfig(max_batch=max_batch, max_waiting=max_waiting, page_size=page_size,
                         prefill_chunk=prefill_chunk, prefill_budget=prefill_budget, kernels=kernels,
                         kv_dtype=kv_dtype)
        except ValueError as e:
            raise EngineError(str(e)) from None
        self.model, cfg = model.eval(), model.config
        self.config = cfg
        self.device = model.model.embed_tokens.weight.device  # (the front ends call torch.set_flush_denormal(True): a
        # process-wide switch, without which denormals slow CPU decoding about tenfold)
        # an engine built on "auto" takes the environment's PARLEY_KERNELS / PARLEY_AMX=0 as a ceiling
        # (what runs where that path cannot falls back), so a whole test suite can run a lower path
        ceiling = EngineConfig().resolved_kernels() if kernels == "auto" else "auto"
        self.fast = self._kernels(model, kernels, kv_dtype) if ceiling in ("auto", "amx") else \
            None if ceiling == "torch" else FastDecoder.create(model, tiles=False, path=ceiling, kv=kv_dtype)
        # a model the C kernels cannot compute runs on PyTorch, and says why (kernels_path, the startup line)
        self.lacking = FastDecoder.unsupported(model)
        if self.lacking and kernels != "torch" and self.device.type == "cpu":
            log.warning("parley engine: this model runs on the slower PyTorch path: the C kernels lack %s", self.lacking)
        # the C path keeps keys and values in its kv_dtype (fast.py); PyTorch in the weights' dtype, or bf16
        # where kv_dtype says so
        dtype = self.fast.kv_dtype if self.fast else \
            torch.bfloat16 if kv_dtype == "bfloat16" else model.model.embed_tokens.weight.dtype
        if kv_budget_bytes is None:
            per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
            kv_budget_bytes = min(2**30, max_batch * cfg.max_position_embeddings * per_token)
        self.cache = PagedKVCache(cfg, kv_budget_bytes, page_size, dtype, self.device)
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self.prefill_budget = prefill_budget
        self.adapters = adapters
        # torch threads of the engine's own thread (None: as inherited). Each OS thread that runs
        # multi-threaded OpenMP work keeps its own team, and with two teams on a 2-core machine libgomp
        # stops spinning, which halves decode speed (RESULTS.md): a server runs every other thread
        # single-threaded and gives the engine's thread all of them.
        self.threads = threads
        self._lock = threading.Condition()
        self._stepping = threading.Lock()  # one thread steps at a time when callers step
        self._waiting: deque[_Entry] = deque()
        self._running: list[_Entry] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._step_seconds = 0.0  # moving average, for Retry-After estimates
        self._stats = dict(steps=0, prefill_tokens=0, reused_tokens=0, decode_tokens=0, finished=0, cancelled=0,
                           failed=0, peak_running=0)

    @classmethod
    def from_config(cls, model: Transformer, cfg: EngineConfig, adapters: dict | None = None) -> Engine:
        """An engine as `cfg` says: the model moved to its device and dtype, the CPU path and sizes;
        `adapters`: Adapters' folder, base and version, to serve the adapters there."""
        model = model.to(device=cfg.resolved_device(), dtype=getattr(torch, cfg.dtype))
        store = Adapters(model, budget_bytes=cfg.adapter_budget_mb * 2**20, **adapters) if adapters else None
        return cls(model, max_batch=cfg.max_batch, max_waiting=cfg.max_waiting,
                   kv_budget_bytes=cfg.kv_budget_mb * 2**20 or None, page_size=cfg.page_size,
                   prefill_chunk=cfg.prefill_chunk, prefill_budget=cfg.prefill_budget,
                   kernels=cfg.resolved_kernels(), threads=cfg.threads or None, adapters=store,
                   kv_dtype=cfg.kv_dtype)

    @staticmethod
    def _kernels(model: Transformer, kernels: str, kv_dtype: str = "auto") -> FastDecoder | None:
        if kernels == "torch":
            return None
        fast = FastDecoder.create(model, tiles=kernels in ("auto", "amx"), path=kernels, kv=kv_dtype)
        if kernels == "amx" and (fast is None or not fast.amx):
            raise EngineError("kernels=amx, but the AMX tile path cannot run here (it needs a CPU with AMX, "
                              "a C compiler, a bf16 model on the CPU with whole-tile shapes): "
                              "use kernels=auto")
        if kernels in ("avx512", "avx2", "scalar") and fast is None:
            lacking = FastDecoder.unsupported(model)
            raise EngineError(f"kernels={kernels}, but the C kernels cannot run here (they need a C compiler and a "
                              "bf16 or fp32 model on the CPU" + (f"; they lack {lacking}" if lacking else "")
                              + "): use kernels=auto")
        return fast

    @property
    def kernels_path(self) -> str:
        """The CPU path the steps run on, chosen once (e.g. "amx", "avx512", "vnni int8 (q4/q8)", "torch",
        "torch (the C kernels lack q/k norm)")."""
        return self.fast.path if self.fast else f"torch (the C kernels lack {self.lacking})" if self.lacking else "torch"

    @property
    def kv_dtype(self) -> str:
        """The precision the paged cache keeps keys and values in ("float32", "bfloat16"), as the startup
        line and /health show it."""
        return str(self.cache.k[0].dtype).removeprefix("torch.")

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def running(self) -> bool:
        """Whether the engine steps on its own thread."""
        return self._thread is not None

    # -- lifecycle
    def start(self) -> Engine:
        """Step on a background thread from now on (a server); idempotent."""
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="parley-engine", daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        """Stop; requests still waiting or running end with "cancelled". New ones are refused."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._stepping:
            for entry in list(self._waiting) + self._running:
                self._finish(entry, Event(entry.request.index, None, "cancelled"))
            self._waiting.clear()
            self._running.clear()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests
    def check_prompt(self, prompt: Sequence[int]) -> None:
        """PromptError unless the model can take this prompt."""
        if len(prompt) == 0:
            raise PromptError("the prompt is empty: give at least one token")
        if len(prompt) >= self.context_length:
            raise PromptError(f"the prompt is {len(prompt)} tokens but the model's context is "
                              f"{self.context_length} tokens: shorten the prompt or the history")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        """Queue a request (thread-safe). PromptError for a prompt the model cannot take or whose
        prompt and max_tokens could never fit in the KV cache, QueueFull when max_waiting requests
        wait already, EngineClosed once closed."""
        return self._submit(prompt_ids, params)

    def _submit(self, prompt_ids: Sequence[int], params: SamplingParams, index: int = 0,
                channel: Channel | None = None) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams (got {type(params).__name__})")
        prompt = [int(t) for t in prompt_ids]
        self.check_prompt(prompt)
        budget = min(params.max_tokens, self.context_length - len(prompt))
        pages = self.cache.pages_for(len(prompt) + budget)
        if pages > self.cache.num_pages:
            raise PromptError(f"the prompt and max_tokens need {pages * self.cache.page_size} tokens of KV cache "
                              f"but the engine holds {self.cache.num_pages * self.cache.page_size}: lower max_tokens, "
                              "shorten the prompt or raise the engine's kv_budget_mb")
        adapter = self._adapter(params.adapter)
        try:
            with self._lock:
                if self._closed:
                    raise EngineClosed("the engine is shut down and takes no new requests")
                if len(self._waiting) >= self.max_waiting:
                    raise QueueFull(len(self._waiting), self._retry_after())
                request = Request(self, next(self._ids), prompt, params, index, channel)
                self._waiting.append(_Entry(request, budget, pages, self.device, adapter))
                self._lock.notify_all()
        except BaseException:
            if adapter is not None:
                self.adapters.release(adapter)
            raise
        return request

    def _adapter(self, name: str) -> Adapter | None:
        """The adapter a request names, held for it (None for the base model)."""
        if not name:
            return None
        if self.adapters is None:
            raise AdapterError(f"this engine serves no adapters, but the request names {name!r}")
        return self.adapters.acquire(name)

    def _let_go(self, entry: _Entry) -> None:
        """A request's adapter may be evicted once the request has ended."""
        if entry.adapter is not None:
            self.adapters.release(entry.adapter)
            entry.adapter = None

    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams]) -> Iterator[Event]:
        """Every prompt's events as they come, `Event.index` the prompt's position. Leaving the
        iteration early cancels what is left of them."""
        params = params_per_prompt(prompts, params)
        for prompt in prompts:  # all or nothing: no request starts if one prompt is bad
            self.check_prompt(prompt)
        channel = Channel()
        requests: list[Request] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                requests.append(self._submit(prompt, p, i, channel))
            for _, event in self._drain(channel, lambda: all(r.done for r in requests)):
                yield event
        finally:
            for request in requests:
                request.cancel()
            self._tidy()

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
        """The tokens of each prompt, once all are done."""
        out = [Completion() for _ in prompts]
        for event in self.stream(prompts, params):
            if event.token is not None:
                out[event.index].tokens.append(event.token)
            if event.finish_reason:
                out[event.index].finish_reason = event.finish_reason
        return out

    def _drain(self, channel: Channel, done) -> Iterator[tuple[Request, Event]]:
        """(request, event) pairs from a channel until it is empty and `done()`: taken as the
        engine's thread delivers them, or, with no thread running, stepping the engine here."""
        while True:
            if channel.empty():
                if done():
                    return
                if not self.running:
                    with self._stepping:
                        if channel.empty() and not done():
                            moved = self._step()
                            if not moved and channel.empty() and not done():  # would spin forever
                                raise EngineError("nothing left to step, yet the request has not ended: a bug")
                    continue
            request, item = channel.get()
            yield request, Request._unwrap(item)

    def _tidy(self) -> None:
        """A caller that steps frees a cancelled request's pages now, computing nothing."""
        if not self.running:
            with self._stepping:
                self.drop_cancelled()

    def stats(self) -> dict:
        """Counters: requests running/waiting (and the most ever running at once), pages
        (total, used, free, cached), tokens prefilled, reused from the prefix cache, decoded;
        steps; requests finished, cancelled, failed."""
        c = self.cache
        with self._lock:
            return dict(self._stats, running=len(self._running), waiting=len(self._waiting),
                        pages_total=c.num_pages, pages_used=c.pages_used, pages_free=c.pages_free,
                        pages_cached=c.pages_cached, page_size=c.page_size)

    def _withdraw(self, request: Request) -> None:
        """A cancelled request still waiting leaves the queue now (it holds no pages yet), so its
        place is free for the next client at once; a running one is ended by the next step."""
        with self._lock:
            entry = next((e for e in self._waiting if e.request is request), None)
            if entry is not None:
                self._waiting.remove(entry)
                self._stats["cancelled"] += 1
            self._lock.notify_all()
        if entry is not None:
            self._let_go(entry)
            request._deliver(Event(request.index, None, "cancelled"))

    def _retry_after(self) -> float:
        """Roughly when a slot frees: the shortest remaining answer at the recent step rate."""
        remaining = min((r.budget - r.generated for r in self._running), default=1)
        return max(1.0, remaining * self._step_seconds)

    # -- stepping
    def step(self) -> None:
        """Run one step in the caller's thread (for tools and tests that drive the engine by hand)."""
        if self.running:
            raise EngineError("the engine's own thread runs the steps: do not call step() after start()")
        with self._stepping:
            self._step()

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._lock:
                while not self._closed and not self._running and not self._waiting:
                    self._lock.wait()
                if self._closed:
                    return
            started = time.perf_counter()
            with self._stepping:
                self._step()
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - started)

    def _step(self) -> bool:
        """One step; whether it computed anything. If it fails, every request in flight fails with
        the cause (their pages freed) and the engine goes on with new ones: clients never hang on
        a broken step."""
        try:
            return self._compute()
        except BaseException as e:
            with self._lock:
                doomed, self._running = self._running + list(self._waiting), []
                self._waiting.clear()
                self._stats["failed"] += len(doomed)
            for entry in doomed:
                self.cache.release(entry.seq)
                self._let_go(entry)
                entry.request._deliver(e)
            if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: the caller's to handle
                raise

    def _finish(self, entry: _Entry, event: Event, wakes: dict | None = None) -> None:
        self.cache.release(entry.seq)
        self._let_go(entry)
        entry.request._deliver(event, wakes)

    def drop_cancelled(self) -> None:
        """End cancelled running requests now and free their pages (each step starts with this;
        a cancelled waiting request has left the queue already, in `_withdraw`). Only the
        stepping thread calls it."""
        for entry in [r for r in self._running if r.request.cancelled]:
            self._running.remove(entry)
            self._stats["cancelled"] += 1
            self._finish(entry, Event(entry.request.index, None, "cancelled"))

    def _admit(self) -> None:
        """FIFO: admit the head of the queue while a slot and its pages are free."""
        with self._lock:
            while self._waiting and len(self._running) < self.max_batch:
                entry = self._waiting[0]
                seq = entry.seq
                # reuse whole cached pages, but always compute the last prompt token (its logits)
                reused = self.cache.match(seq, len(seq.tokens) - 1)
                if entry.pages_needed - len(seq.pages) > self.cache.pages_free:
                    self.cache.release(seq)
                    seq.length, seq.hashes = 0, []
                    return
                seq.pages += self.cache.allocate(entry.pages_needed - len(seq.pages))
                self._stats["reused_tokens"] += reused
                self._running.append(self._waiting.popleft())
                self._stats["peak_running"] = max(self._stats["peak_running"], len(self._running))

    @torch.inference_mode()
    def _compute(self) -> bool:
        self.drop_cancelled()
        self._admit()
        decodes, prompts, left = [], [], self.prefill_budget
        # on the C kernels every row's arithmetic, attention included, is the same wherever its
        # prompt is cut (tests/test_tiles.py, test_kernel_paths.py), so a prompt takes whatever is
        # left of the budget
        any_cut = self.fast is not None and self.fast.all_rows
        for entry in self._running:
            seq = entry.seq
            if not entry.prefilling:
                decodes.append((entry, 1))
            elif left > 0 and any_cut:
                n = min(left, len(seq.tokens) - seq.length)
                prompts.append((entry, n))
                left -= n
            elif left > 0:
                # else a prompt is cut into the same chunks however it is batched (prefill_chunk
                # tokens from its start; flash attention's sums depend on the cut), so its numbers,
                # and its answer, are those it gets alone: one that does not fit in what is left of
                # this step's budget starts the next step
                n = min(self.prefill_chunk, len(seq.tokens) - seq.length)
                if n > left:
                    left = 0  # later prompts wait too: prompts are prefilled in arrival order
                    continue
                prompts.append((entry, n))
                left -= n
        feeds = decodes + prompts
        if not feeds:
            return False
        if self.fast and self.fast.all_rows:  # every row through the C layers
            # decode rows of one adapter side by side: on tiles a 16-row block's rows of one adapter
            # share its products (fast.py's segments); a row's bits do not depend on where it sits
            if self.adapters is not None:
                decodes.sort(key=lambda feed: feed[0].adapter.key if feed[0].adapter else "")
            # one-token feeds (decode rows, and prompts down to their last token) go first
            chunks = [feed for feed in prompts if feed[1] > 1]
            feeds = decodes + [feed for feed in prompts if feed[1] == 1] + chunks
            batch = self.cache.batch([(r.seq, n) for r, n in feeds])
            lora = self._lora(feeds)
            logits = self.fast.step_rows(batch, lora) if chunks else self.fast.step_paged(batch, lora)
        elif self.fast:  # decode rows on the C step, prompt chunks on the model's forward
            logits = [self.fast.step_paged(self.cache.batch([(r.seq, 1) for r, _ in decodes]), self._lora(decodes))] \
                if decodes else []
            logits += [self._forward(prompts)] if prompts else []
            logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        else:
            logits = self._forward(feeds)
        self._stats["steps"] += 1
        self._stats["prefill_tokens"] += sum(n for _, n in prompts)
        choosing = []  # prompt done: these rows choose a token
        for row, (entry, _) in enumerate(feeds):
            self.cache.publish(entry.seq)
            if entry.seq.length == len(entry.seq.tokens):
                choosing.append((row, entry))
        # plain greedy rows take one argmax for all of them, not one call each
        plain = [row for row, r in choosing if r.request.params.greedy and r.request.params.repetition_penalty == 1.0]
        best = {}
        if plain and self.fast and logits.dtype == torch.float32 and logits.is_contiguous():
            best = dict(zip(plain, self.fast.argmax(logits, plain)))
        elif plain:
            best = dict(zip(plain, logits[plain].argmax(-1).tolist()))
        wakes: dict = {}  # each event loop is woken once, when the step's events are all out
        try:
            for row, entry in choosing:
                self._sample(entry, logits[row], best.get(row), wakes)
        finally:
            Channel.wake(wakes)
        return True

    def _forward(self, feeds: list[tuple[_Entry, int]]) -> torch.Tensor:
        batch = self.cache.batch([(r.seq, n) for r, n in feeds])
        with applied(self.model, [r.adapter for r, n in feeds for _ in range(n)]):
            return self.model(torch.tensor([batch.ids], device=self.device), batch)[0]

    def _lora(self, feeds: list[tuple[_Entry, int]]) -> torch.Tensor | None:
        """Each packed row's adapter for the C kernels (None when no row has one)."""
        if all(r.adapter is None for r, _ in feeds):
            return None
        return row_pointers([r.adapter for r, n in feeds for _ in range(n)])

    def _sample(self, entry: _Entry, logits: torch.Tensor, token: int | None, wakes: dict) -> None:
        """Deliver the request's next token: `token` when chosen already, else its sampler's pick."""
        params, seq, index = entry.request.params, entry.seq, entry.request.index
        if token is None:
            context = torch.as_tensor(seq.tokens, device=self.device) if params.repetition_penalty != 1.0 else _EMPTY
            token = entry.sampler(logits, context)
        if token in params.stop_ids:
            event = Event(index, None, "stop")
        else:
            entry.generated += 1
            self._stats["decode_tokens"] += 1
            seq.tokens.append(token)
            event = Event(index, token, "length" if entry.generated >= entry.budget else None)
        if event.finish_reason:
            self._running.remove(entry)
            self._stats["finished"] += 1
            self._finish(entry, event, wakes)
        else:
            entry.request._deliver(event, wakes)


_EMPTY = torch.zeros(0, dtype=torch.long)
