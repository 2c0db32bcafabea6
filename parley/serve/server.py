"""The app's state and shared services: one `Server` per app, that every route module closes over.

    server = Server(settings, engine, "smollm2", tokenizer)
    server.store()                 # this thread's connection to the database
    server.authenticate(request)   # the User of a request's bearer key (the routes' dependency)
    server.turns.start(user, conversation_id, "hello", overrides={})   # a pipeline turn
    server.refresh()               # switch to a newly promoted version of the model (between turns)

Each thread gets its own `Store` connection, as SQLite wants. Authentication is a dependency:
a bearer key known to the store (per-key token-bucket rate limit), or, with `no_auth` on a
loopback address only, everyone is the user `settings.user` ("local").

A new version of the model (`parley learn` promoted one, or `parley models rollback`) is picked
up without a restart: every authenticated request first compares the registry's stamp (where
the model's link points) with the one it serves; on a change it loads the new version, builds
its engine and turn runner, and serves from them from then on. Turns and completions already
running finish on the old engine, which is closed once they have (`_retire`).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import deque

import numpy as np
from fastapi import Request

from parley.registry import Registry, store_target
from parley.serve.errors import APIError
from parley.engine.engine import Engine
from parley.serve.metrics import Metrics
from parley.serve.settings import Settings
from parley.store import Store, User

EMBEDDING_MODEL = "all-minilm-l6-v2"
ASSISTANT_MODEL = "parley"


class TokenBuckets:
    """Per key: `rate` requests a minute, in bursts of up to `rate`."""

    def __init__(self, per_minute: int):
        self.rate, self._lock, self._buckets = per_minute, threading.Lock(), {}

    def take(self, key: str, spend: bool = True) -> float | None:
        """None if the request may go on, else the seconds until it may. With spend=False, only
        look: nothing is taken."""
        if self.rate == 0:
            return None
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.rate), now))
            tokens = min(float(self.rate), tokens + (now - last) * self.rate / 60)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return (1 - tokens) * 60 / self.rate
            self._buckets[key] = (tokens - int(spend), now)
            return None


class FairLock:
    """A lock handed to its waiters in the order they came (threading.Lock is not: a thread that
    releases and at once acquires again usually wins). Big embedding requests take it once per
    batch, so a turn's embedding waits behind at most the one batch running."""

    def __init__(self):
        self._mutex, self._queue, self._held = threading.Lock(), deque(), False

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def __enter__(self) -> None:
        with self._mutex:
            if not self._held:
                self._held = True
                return
            turn = threading.Event()
            self._queue.append(turn)
        turn.wait()  # the releasing thread hands the lock over: _held stays True

    def __exit__(self, *exc) -> None:
        with self._mutex:
            if self._queue:
                self._queue.popleft().set()
            else:
                self._held = False


class Server:
    """The app's state and shared services."""

    def __init__(self, settings: Settings, engine: Engine, model_name: str, tokenizer, embedder=None,
                 swappable: bool = False):
        """`swappable`: the engine was loaded from the registry, so a new version may replace it
        (an engine handed to the app stays the caller's: no switching then)."""
        self.settings, self.engine, self.model_name, self.tokenizer = settings, engine, model_name, tokenizer
        self.db = store_target(settings.db)
        self.registry = Registry(settings.home or None)
        self.metrics, self.buckets = Metrics(), TokenBuckets(settings.requests_per_minute)
        self.failures = TokenBuckets(settings.failed_auth_per_minute)  # per client address
        self._embedder, self.embed_lock, self._local = embedder, FairLock(), threading.local()
        self.swappable, self._swapping, self.retired = swappable, threading.Lock(), []
        self.version = self.registry.stamp(model_name) if swappable else None
        self.turns = self._runner(engine, tokenizer)
        with Store(self.db) as store:
            # conversations whose first turn a killed process never finished: nobody can answer them
            store.drop_unsaved()
            if settings.no_auth and store.get_user_by_name(settings.user) is None:
                store.add_user(settings.user, role="admin")

    def _runner(self, engine: Engine, tokenizer):
        from parley.serve.turns import TurnRunner

        assistant = dataclasses.replace(self.settings.assistant(), db=self.db)
        return TurnRunner(assistant, self.store, engine, tokenizer, self.embed, self.settings.pipeline_workers,
                          self.settings.max_pending, single_threaded=bool(self.settings.engine.threads),
                          registry=self.registry)

    def refresh(self) -> None:
        """Serve the model's current version: if the registry's stamp moved since the last look,
        load that version and switch to it (the old engine retires in the background)."""
        if not self.swappable or self.registry.stamp(self.model_name) == self.version:
            return
        import torch

        with self._swapping:
            stamp = self.registry.stamp(self.model_name)
            if stamp == self.version:  # another request switched meanwhile
                return
            model, tokenizer, _ = self.registry.load(self.model_name, dtype=getattr(torch, self.settings.engine.dtype))
            from parley.learn.personal import serving

            engine = Engine.from_config(model, self.settings.engine,
                                        adapters=serving(self.model_name, self.registry)).start()
            old = (self.turns, self.engine)
            self.turns, self.engine, self.tokenizer, self.version = self._runner(engine, tokenizer), engine, tokenizer, stamp
            retiring = threading.Thread(target=_retire, args=old, name="parley-retire", daemon=True)
            self.retired.append(retiring)
            retiring.start()

    def store(self) -> Store:
        """This thread's connection to the database."""
        if getattr(self._local, "store", None) is None:
            self._local.store = Store(self.db)
        return self._local.store

    def embedder(self):
        """MiniLM (loaded on first use), or the embedder the app was given."""
        with self.embed_lock:
            if self._embedder is None:
                from parley.pipeline.embed import Embedder

                self._embedder = Embedder.load()
            return self._embedder

    def embed(self, texts: list[str], remember: bool = True) -> np.ndarray:
        """Embeddings of `texts`, `embedding_batch` texts at a time, each batch under the fair
        lock (one at a time, as the model's cache wants): a long request (an upload's chunks, a
        big /v1/embeddings) lets every turn that asks meanwhile go between two of its batches.
        `remember=False` for what a caller sends outside a turn: it neither reads nor fills the
        embedder's memory of recent texts, which all users share (see Embedder.encode)."""
        embedder, size = self.embedder(), self.settings.embedding_batch
        options = {} if remember else {"remember": False}
        parts = []
        for start in range(0, len(texts), size):
            with self.embed_lock:
                if self.settings.engine.threads:  # keep request threads off OpenMP teams: see serve_main
                    import torch

                    torch.set_num_threads(1)
                parts.append(np.asarray(embedder(texts[start:start + size], **options), dtype=np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    def embed_once(self, texts: list[str]) -> np.ndarray:
        """`embed` for texts a caller sends outside a turn (a memory fact, a document's chunks)."""
        return self.embed(texts, remember=False)

    def count_embedding_tokens(self, texts: list[str]) -> int:
        return sum(len(e.ids) for e in self.embedder().tokenizer.encode_batch(texts))

    def authenticate(self, request: Request) -> User:
        """The dependency every /v1 and /api route takes."""
        if self.settings.no_auth:
            user, key = self.store().get_user_by_name(self.settings.user), self.settings.user
        else:  # the middleware has looked the key up already for a request with a body
            user, key = getattr(request.state, "key_user", None) or \
                self.key_user(request.headers.get("authorization", ""), request.client.host if request.client else "")
        wait = self.buckets.take(key)
        if wait is not None:
            raise APIError(429, f"rate limit of {self.settings.requests_per_minute} requests a minute reached for "
                           f"this key; retry in {math.ceil(wait)} s", code="rate_limit_exceeded", retry_after=wait)
        self.refresh()  # between requests: a newly promoted version serves this one
        return user

    def key_user(self, authorization: str, client: str) -> tuple[User, str]:
        """The user of an Authorization header's bearer key, and the key; a 401 if there is none or
        it is unknown, and a 429 for a client address past its failed authentications a minute
        (then no key of it is looked at, good or bad). The middleware also calls it, before a
        request's body is read."""
        blocked = self.failures.take(client, spend=False)
        if blocked is not None:
            raise APIError(429, f"too many failed authentications from this address; retry in {math.ceil(blocked)} s",
                           code="rate_limit_exceeded", retry_after=blocked)
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            self.failures.take(client)
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY' "
                           "(create one with `parley users key NAME`)", code="missing_api_key")
        user = self.store().user_for_key(key.strip())
        if user is None:
            self.failures.take(client)
            raise APIError(401, "invalid API key: check it, or create a new one with `parley users key NAME`",
                           code="invalid_api_key")
        return user, key.strip()

    def close(self) -> None:
        self.turns.close()


def _retire(turns, engine: Engine, patience_s: float = 600.0) -> None:
    """Let the old version's turns and completions finish, then close its engine."""
    turns.close()  # waits for the turns running or queued on it
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        stats = engine.stats()
        if not stats["running"] and not stats["waiting"]:
            break
        time.sleep(0.05)
    engine.close()
