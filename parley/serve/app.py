"""The HTTP server: `create_app(settings)` builds the whole app, with no global state.

    app = create_app(Settings(db="parley.db", model="smollm2"))
    uvicorn.run(app, host="127.0.0.1", port=8000)      # what `parley serve` does

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    client.chat.completions.create(model="parley", messages=[{"role": "user", "content": "hi"}])

Everything a route needs lives on one `Server` object (settings, the model's tokenizer, the
generator, the embedder, the turn runner, metrics, rate limits) that the route modules close
over. Each thread gets its own `Store` connection, as SQLite wants. Authentication is a
dependency: a bearer key known to the store (per-key token-bucket rate limit), or, with
`no_auth` on a loopback address only, everyone is the local user "local".
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request

from parley.pipeline.assistant import DEFAULT_STAGES
from parley.registry import Registry
from parley.serve import errors
from parley.serve.errors import APIError
from parley.serve.generation import Generator, SchedulerGenerator, SerialGenerator
from parley.serve.metrics import Metrics, MetricsMiddleware
from parley.store import Store, User

EMBEDDING_MODEL = "all-minilm-l6-v2"
ASSISTANT_MODEL = "parley"


class ServeError(ValueError):
    """Settings the server cannot start with."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Settings:
    db: str | Path
    home: str | Path | None = None  # the model registry's folder (None: PARLEY_HOME)
    model: str = "smollm2"
    host: str = "127.0.0.1"
    no_auth: bool = False
    requests_per_minute: int = 600  # per key; 0 = no limit
    max_pending: int = 32  # generation requests waiting; more get 429
    max_body_bytes: int = 2_000_000
    max_upload_bytes: int = 10_000_000
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    pipeline_workers: int = 4
    default_max_tokens: int = 512
    dtype: str = "bfloat16"
    batching: bool = True  # continuous batching (engine/scheduler.py); False: one request at a time
    threads: int | None = None  # torch threads of the scheduler thread (serve_main: all; every other thread: 1)

    def __post_init__(self):
        if self.no_auth and not is_loopback(self.host):
            raise ServeError(f"--no-auth serves everyone as one user, so it is allowed only on a loopback address "
                             f"(127.0.0.1, ::1, localhost), not {self.host!r}: drop --no-auth and create keys "
                             "with `parley users add NAME` and `parley users key NAME`")
        for name in ("requests_per_minute", "max_pending", "max_body_bytes", "max_upload_bytes", "pipeline_workers",
                     "default_max_tokens"):
            if getattr(self, name) < (0 if name == "requests_per_minute" else 1):
                raise ServeError(f"{name} must be positive (got {getattr(self, name)})")
        if self.dtype not in ("float32", "bfloat16"):
            raise ServeError(f"dtype must be float32 or bfloat16, not {self.dtype!r}")


class TokenBuckets:
    """Per key: `rate` requests a minute, in bursts of up to `rate`."""

    def __init__(self, per_minute: int):
        self.rate, self._lock, self._buckets = per_minute, threading.Lock(), {}

    def take(self, key: str) -> float | None:
        """None if the request may go on, else the seconds until it may."""
        if self.rate == 0:
            return None
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.rate), now))
            tokens = min(float(self.rate), tokens + (now - last) * self.rate / 60)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                return (1 - tokens) * 60 / self.rate
            self._buckets[key] = (tokens - 1, now)
            return None


class Server:
    """The app's state and shared services."""

    def __init__(self, settings: Settings, generator: Generator, model_name: str, tokenizer, embedder=None):
        from parley.serve.turns import TurnRunner

        self.settings, self.generator, self.model_name, self.tokenizer = settings, generator, model_name, tokenizer
        self.registry = Registry(settings.home)
        self.metrics, self.buckets = Metrics(), TokenBuckets(settings.requests_per_minute)
        self._embedder, self._embed_lock, self._local = embedder, threading.Lock(), threading.local()
        self.turns = TurnRunner(str(settings.db), settings.stages, settings.default_max_tokens, generator,
                                tokenizer, self.embed, settings.pipeline_workers, settings.max_pending,
                                single_threaded=bool(settings.threads))
        if settings.no_auth:
            with Store(settings.db) as store:
                if store.get_user_by_name("local") is None:
                    store.add_user("local", role="admin")

    def store(self) -> Store:
        """This thread's connection to the database."""
        if getattr(self._local, "store", None) is None:
            self._local.store = Store(self.settings.db)
        return self._local.store

    def embed(self, texts: list[str]) -> np.ndarray:
        """MiniLM embeddings (loaded on first use); one call at a time, as the model's cache wants."""
        with self._embed_lock:
            if self.settings.threads:  # keep request threads off OpenMP teams: see Settings.threads
                import torch

                torch.set_num_threads(1)
            if self._embedder is None:
                from parley.pipeline.embed import Embedder

                self._embedder = Embedder.load()
            return self._embedder(texts)

    def count_embedding_tokens(self, texts: list[str]) -> int:
        self.embed(texts[:1])  # loads it
        return sum(len(e.ids) for e in self._embedder.tokenizer.encode_batch(texts))

    def authenticate(self, request: Request) -> User:
        """The dependency every /v1 and /api route takes."""
        store = self.store()
        if self.settings.no_auth:
            user, key = store.get_user_by_name("local"), "local"
        else:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY' "
                               "(create one with `parley users key NAME`)", code="missing_api_key")
            user = store.user_for_key(key.strip())
            if user is None:
                raise APIError(401, "invalid API key: check it, or create a new one with `parley users key NAME`",
                               code="invalid_api_key")
        wait = self.buckets.take(key)
        if wait is not None:
            raise APIError(429, f"rate limit of {self.settings.requests_per_minute} requests a minute reached for "
                           f"this key; retry in {math.ceil(wait)} s", code="rate_limit_exceeded", retry_after=wait)
        return user

    def close(self) -> None:
        self.turns.close()
        self.generator.close()


def create_app(settings: Settings, generator: Generator | None = None, tokenizer=None, embedder=None) -> FastAPI:
    """The app for these settings. `generator` and `tokenizer` (both or neither) replace loading
    `settings.model` from the registry; `embedder` replaces loading MiniLM on first use."""
    from parley.serve.routes_openai import openai_routes
    from parley.serve.routes_parley import parley_routes
    from parley.serve.routes_ui import ui_routes

    if (generator is None) != (tokenizer is None):
        raise ServeError("give both generator and tokenizer, or neither")
    if generator is None:
        import torch

        from parley.engine.engine import Engine

        model, tokenizer, _ = Registry(settings.home).load(settings.model, dtype=getattr(torch, settings.dtype))
        if settings.batching:
            from parley.engine.scheduler import Scheduler

            generator = SchedulerGenerator(Scheduler(model, max_waiting=settings.max_pending,
                                                     threads=settings.threads))
        else:
            generator = SerialGenerator(Engine(model), max_pending=settings.max_pending)
    server = Server(settings, generator, settings.model, tokenizer, embedder)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    app = FastAPI(title="Parley", version="0.1.0", lifespan=lifespan, responses=errors.RESPONSES)
    app.state.server = server
    errors.install(app)
    app.include_router(openai_routes(server))
    app.include_router(parley_routes(server))
    app.include_router(ui_routes(server))

    def limit(path: str) -> int:
        return settings.max_upload_bytes + 64_000 if path.startswith("/api/knowledge") else settings.max_body_bytes

    app.add_middleware(MetricsMiddleware, metrics=server.metrics, limit=limit)
    return app
