"""The HTTP server: `create_app(settings)` builds the whole app, with no global state.

    app = create_app(Settings(db="parley.db", model="smollm2"))
    uvicorn.run(app, host="127.0.0.1", port=8000, http=BoundedHttp)   # what `parley serve` does (serve/http.py)

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    client.chat.completions.create(model="parley", messages=[{"role": "user", "content": "hi"}])

Everything a route needs lives on one `Server` object (parley/serve/server.py: settings, the
model's tokenizer, the engine, the embedder, the turn runner, metrics, rate limits) that the
route modules close over; they import it from there, never from this module, so nothing
imports in a circle. Settings are in parley/serve/settings.py.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from parley.registry import Registry
from parley.serve import errors
from parley.serve.metrics import MetricsMiddleware
from parley.serve.origins import BrowserGuard
from parley.serve.server import Server
from parley.serve.settings import ServeError, Settings


def create_app(settings: Settings, engine=None, tokenizer=None, embedder=None) -> FastAPI:
    """The app for these settings. `engine` (a parley.engine.engine.Engine) and `tokenizer`, both
    or neither, replace loading `settings.model` from the registry: the app starts that engine
    but leaves closing it to the caller, and closes only an engine it built. `embedder` replaces
    loading MiniLM on first use."""
    from parley.serve.routes_audio import Voices, audio_routes
    from parley.serve.routes_learn import learn_routes
    from parley.serve.routes_openai import openai_routes
    from parley.serve.routes_parley import parley_routes
    from parley.serve.routes_ui import ui_routes
    from parley.serve.routes_voice import voice_routes

    if (engine is None) != (tokenizer is None):
        raise ServeError("give both engine and tokenizer, or neither")
    owned = engine is None
    if owned:
        import torch

        from parley.engine.engine import Engine
        from parley.learn.personal import serving

        registry = Registry(settings.home or None)
        model, tokenizer, _ = registry.load(settings.model, dtype=getattr(torch, settings.engine.dtype))
        # each user's turns are served with their own adapter, where they have one
        engine = Engine.from_config(model, settings.engine, adapters=serving(settings.model, registry))
    server = Server(settings, engine.start(), settings.model, tokenizer, embedder, swappable=owned)
    voices = Voices()  # the speech models, loaded on first use: the audio routes and the live voice route share them

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()
        voices.close()
        if owned:
            server.engine.close()  # the current version's (a switch retires the ones before)

    app = FastAPI(title="Parley", version="0.1.0", lifespan=lifespan, responses=errors.RESPONSES)
    app.state.server = server
    errors.install(app)
    app.include_router(openai_routes(server))
    app.include_router(parley_routes(server))
    app.include_router(ui_routes(server))
    app.include_router(audio_routes(server, voices))
    app.include_router(voice_routes(server, voices))
    app.include_router(learn_routes(server))

    def limit(path: str) -> int:
        uploads = ("/api/knowledge", "/v1/audio/transcriptions")  # a file in a multipart form
        return settings.max_upload_bytes + 64_000 if path.startswith(uploads) else settings.max_body_bytes

    async def authorize(scope) -> None:  # a key's check before the body is read: see MetricsMiddleware
        if not settings.no_auth:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            client = scope["client"][0] if scope.get("client") else ""
            # the route's `authenticate` takes the user from here instead of looking the key up again
            scope.setdefault("state", {})["key_user"] = await run_in_threadpool(server.key_user, header, client)

    # innermost: a JSON body is checked before it is parsed, once MetricsMiddleware has bounded its size
    app.add_middleware(errors.JsonBodyCheck)
    app.add_middleware(MetricsMiddleware, metrics=server.metrics, limit=limit, authorize=authorize)
    # outermost: a foreign Host or a cross-site write is refused before its key or body is read
    app.add_middleware(BrowserGuard, bind=settings.host, allowed_hosts=settings.allowed_hosts,
                       allowed_origins=settings.allowed_origins)
    return app
