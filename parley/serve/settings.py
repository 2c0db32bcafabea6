"""What `parley serve` runs with: every setting of the assistant (the same keys as `parley
chat`, engine section included) plus the server's own.

    parley serve persona="You are terse." web_search_url=http://127.0.0.1:8888 --port 8000
    parley serve --help                         # every key once, with its type and default

    settings = Settings(db="parley.db", model="smollm2", engine=EngineConfig(max_batch=1))
    create_app(settings)                        # parley/serve/app.py

The assistant behind the API ("model": "parley") is built from `settings.assistant()`; raw
completions use the same model, engine section and `max_tokens` default.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, fields

from parley.config import setting
from parley.pipeline.assistant import AssistantConfig


class ServeError(ValueError):
    """Settings the server cannot start with."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _well_formed(value: str, origin: bool) -> bool:
    """An origin is scheme://host[:port] and nothing more; a host is a name or an address."""
    host = r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?"
    return re.fullmatch(rf"https?://{host}/?" if origin else host, value) is not None


@dataclass
class Settings(AssistantConfig):
    host: str = setting("127.0.0.1", "address to bind")
    port: int = setting(8000, "TCP port to listen on")
    no_auth: bool = setting(False, "no API keys: every request is the user `user`; loopback addresses only")
    requests_per_minute: int = setting(600, "requests a minute per API key (0 = no limit)")
    failed_auth_per_minute: int = setting(30, "failed authentications a minute per client address; past them the "
                                              "address gets HTTP 429 without its key being looked at (0 = no limit)")
    max_connections_per_client: int = setting(64, "connections one client address may hold open at once; one more "
                                                  "is answered HTTP 429 and closed (behind a reverse proxy every "
                                                  "client has the proxy's address: raise it there; 0 = no limit)")
    max_connections: int = setting(512, "connections all clients together may hold open; one more is answered "
                                        "HTTP 503 and closed (keep it under the open-file limit, `ulimit -n`; "
                                        "0 = no limit)")
    max_pending: int = setting(32, "assistant turns that may wait for a pipeline worker; more get HTTP 429")
    max_body_bytes: int = setting(2_000_000, "largest request body, in bytes")
    max_upload_bytes: int = setting(10_000_000, "largest document upload (/api/knowledge), in bytes")
    pipeline_workers: int = setting(4, "assistant turns that run at once")
    max_embedding_inputs: int = setting(256, "texts one /v1/embeddings request may give; more get HTTP 400")
    max_embedding_chars: int = setting(200_000, "characters, all texts together, one /v1/embeddings request may "
                                                "give; more get HTTP 400")
    embedding_batch: int = setting(4, "texts embedded at a time: a turn's own embedding waits for at most one "
                                      "such batch of another request (an upload, /v1/embeddings)")
    home: str = setting("", "the model registry's folder ('' = PARLEY_HOME)")
    allowed_hosts: str = setting("", "more Host names to answer for, comma-separated, beyond localhost and the "
                                     "addresses served (DNS-rebinding guard: others get HTTP 421); '*' = any")
    allowed_origins: str = setting("", "web page origins (https://app.example) that may call the API from a "
                                       "browser: writes and CORS; '' = this server's own page only")
    voice_idle_seconds: float = setting(60.0, "a live voice session (/api/voice) with no message for this long "
                                              "is closed")
    voice_max_utterance_seconds: float = setting(30.0, "longest utterance the live voice route listens to; a "
                                                       "longer one is cut there and answered")

    def __post_init__(self):
        if self.no_auth and not is_loopback(self.host):
            raise ServeError(f"--no-auth serves everyone as one user, so it is allowed only on a loopback address "
                             f"(127.0.0.1, ::1, localhost), not {self.host!r}: drop --no-auth and create keys "
                             "with `parley users add NAME` and `parley users key NAME`")
        for name in ("failed_auth_per_minute", "max_connections_per_client", "max_connections"):
            if getattr(self, name) < 0:
                raise ServeError(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("requests_per_minute", "max_pending", "max_body_bytes", "max_upload_bytes", "pipeline_workers",
                     "max_tokens", "max_embedding_inputs", "max_embedding_chars", "embedding_batch", "voice_idle_seconds",
                     "voice_max_utterance_seconds"):
            if getattr(self, name) < (0 if name == "requests_per_minute" else 1):
                raise ServeError(f"{name} must be positive (got {getattr(self, name)})")
        for name, what, example in (("allowed_hosts", "a host name", "parley.lan,10.0.0.5"),
                                    ("allowed_origins", "an origin", "https://app.example:8443")):
            for item in filter(None, (n.strip() for n in getattr(self, name).split(","))):
                if not (item == "*" and name == "allowed_hosts") and not _well_formed(item, name == "allowed_origins"):
                    raise ServeError(f"{name}: {item!r} is not {what}; give a comma-separated list such as {example}")
        if not 0 <= self.port <= 65535:
            raise ServeError(f"port must be 0..65535, not {self.port}")

    def assistant(self) -> AssistantConfig:
        """The assistant's part of these settings (every key `parley chat` also takes)."""
        return AssistantConfig(**{f.name: getattr(self, f.name) for f in fields(AssistantConfig)})
