"""A throwaway PostgreSQL server for tests, and a store target fixture over both databases.

One server per test session (started on first use, stopped at exit) listens only on a unix
socket in a temporary folder; each test gets a fresh database, dropped afterwards. Tests
that ask for Postgres are skipped, with the reason, where the server binaries or psycopg
are missing. Running as root, the server runs as the `postgres` user (initdb refuses root).

    from pg import store_target          # a fixture: a SQLite path, then a postgresql:// URL

    def test_x(store_target):
        with Store(store_target) as store: ...
"""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(candidates[-1]).parent if candidates else None


class PgServer:
    def __init__(self) -> None:
        import psycopg  # before anything starts: without it there is nothing to test

        bin_dir = _bin_dir()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL server binaries (initdb) on this machine")
        self.root = Path(tempfile.mkdtemp(prefix="parley-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root without runuser: cannot start PostgreSQL as another user")
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.pg_ctl = str(bin_dir / "pg_ctl")
        self._run(str(bin_dir / "initdb"), "-D", str(self.data), "-U", "parley", "-A", "trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        options = f"-k {self.root} -c listen_addresses='' -F -c full_page_writes=off -c max_connections=40"
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "start")
        atexit.register(self.stop)
        self.admin = psycopg.connect(self.url("postgres"), autocommit=True)

    def _run(self, *command: str) -> None:
        done = subprocess.run([*self.as_user, *command], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} failed: {done.stderr or done.stdout}")

    def url(self, database: str) -> str:
        return f"postgresql://parley@/{database}?host={self.root}"

    def create_database(self) -> str:
        name = "t_" + secrets.token_hex(6)
        self.admin.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.admin.execute(f"DROP DATABASE {name} WITH (FORCE)")

    def stop(self) -> None:
        self.admin.close()
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


_servers: list[PgServer | str] = []  # the session's server, or why there is none


def pg_server() -> PgServer:
    """The session's server, started on first use; skips the test where there can be none."""
    if not _servers:
        try:
            _servers.append(PgServer())
        except (ImportError, RuntimeError, OSError) as e:
            _servers.append(f"PostgreSQL unavailable: {e}")
    server = _servers[0]
    if isinstance(server, str):
        pytest.skip(server)
    return server


@pytest.fixture(params=["sqlite", "postgres"])
def store_target(request, tmp_path):
    """Where a Store lives: a fresh SQLite file, or a fresh database on the test server."""
    if request.param == "sqlite":
        yield tmp_path / "parley.db"
        return
    server = pg_server()
    name = server.create_database()
    yield server.url(name)
    server.drop_database(name)
