"""The server's settings: what `parley serve` and `create_app` take, checked once.

    settings = Settings(db="parley.db", model="smollm2", host="127.0.0.1")
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from parley.pipeline.assistant import DEFAULT_STAGES


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
