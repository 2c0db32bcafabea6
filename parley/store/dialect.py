"""What differs between the store's two databases, SQLite and PostgreSQL, in one place.

`Store` writes its SQL once, with `?` placeholders, and asks a dialect for the rest:

    dialect = dialect_for("postgresql://parley@localhost/parley")   # or a file path: SQLite
    db = dialect.connect(target, timeout=5.0)      # db.execute(sql, args) takes `?` on both
    new_id = dialect.insert(db, "INSERT INTO users (name, role, created_at) VALUES (?, ?, ?)", args)
    match = dialect.match("solar panels")          # full-text search: FROM, WHERE and score

The differences:

- connection: sqlite3 (WAL, foreign keys on, busy timeout) or psycopg 3 in autocommit mode
  behind `PgConnection`, which turns `?` into `%s`; transactions are explicit BEGIN/COMMIT on
  both (SQLite takes the write lock up front with BEGIN IMMEDIATE).
- new ids: `cursor.lastrowid` on SQLite, `RETURNING id` on PostgreSQL.
- migrations: two numbered lists with the same version numbers and the same tables and
  columns (`schema.MIGRATIONS`, `schema_pg.PG_MIGRATIONS`); PostgreSQL takes an advisory lock
  so two processes opening a new database migrate it once. SQLite migrates with foreign keys
  off (a migration that rebuilds a table must not cascade the old table's DROP) and checks
  every reference before it commits.
- full-text search: an FTS5 table ranked by bm25 on SQLite; on PostgreSQL a GIN index on
  `to_tsvector('simple', text)` ranked by `ts_rank`, reported negated so that on both a
  lower score is better. The 'simple' configuration, like FTS5's default tokenizer, lowercases
  and neither stems nor drops stop words; each query word is a phrase, and the words are OR-ed.
  Rankings may differ between the two.
- literal substring search: `instr` versus `strpos`.

Vectors are float32 bytes (BLOB / BYTEA) compared in numpy by the callers on both databases:
pgvector is not assumed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, Protocol

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class DialectError(ValueError):
    """The store's target names no database this Parley can open."""


def database_errors() -> tuple[type[Exception], ...]:
    """The exception base classes of both drivers (psycopg only when it is installed)."""
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


class Match(NamedTuple):
    """Full-text search as SQL pieces: `source` joins chunks (as c), `condition` keeps the
    matching ones, `score` ranks them (lower is better); `args` fill source, then condition."""

    source: str
    condition: str
    score: str
    args: tuple[Any, ...]


class Connection(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = ...) -> Any: ...

    def close(self) -> None: ...


class SQLite:
    name = "sqlite"
    begin = "BEGIN IMMEDIATE"  # the write lock up front: writers queue instead of failing
    migration_lock: str | None = None  # BEGIN IMMEDIATE already serialises migrations
    contains = "instr(lower({column}), lower(?)) > 0"
    integrity_error: type[Exception] = sqlite3.IntegrityError

    def connect(self, target: str | Path, timeout: float) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so transactions are explicit
        db = sqlite3.connect(target, timeout=timeout, isolation_level=None)
        # switching a new file to WAL can find it locked by another connection doing the same, and
        # SQLite does not wait for that lock here as it does for others: wait for it ourselves
        deadline = time.monotonic() + timeout
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    db.close()
                    raise
                time.sleep(0.005)
        db.execute("PRAGMA foreign_keys=ON")  # off by default; cascades depend on it
        db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
        return db

    def insert(self, db: Connection, sql: str, args: Sequence[Any]) -> int:
        return db.execute(sql, args).lastrowid

    @contextmanager
    def migrating(self, db: Connection) -> Iterator[None]:
        """Foreign keys off around a migration's transaction (inside one the pragma is ignored):
        rebuilding a table drops the old one, and that DROP would otherwise delete, by cascade,
        every row that refers to it."""
        db.execute("PRAGMA foreign_keys=OFF")
        try:
            yield
        finally:
            db.execute("PRAGMA foreign_keys=ON")

    def check_references(self, db: Connection) -> None:
        """Inside the migration's transaction: fail (and roll back) if a reference now dangles."""
        broken = db.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise sqlite3.IntegrityError(f"the migration left {len(broken)} dangling references, e.g. {broken[0]}")

    def match(self, query: str) -> Match | None:
        # each word a quoted phrase (quotes doubled), so no text is an FTS5 syntax error
        words = " OR ".join('"' + word.replace('"', '""') + '"' for word in query.split())
        if not words:
            return None
        source = "chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid"
        return Match(source, "chunks_fts MATCH ?", "bm25(chunks_fts)", (words,))


class PgConnection:
    """A psycopg connection called as sqlite3's is: `?` placeholders, args always a sequence.
    Every `?` in the SQL text is a placeholder: the store's SQL holds no literal one."""

    def __init__(self, conn: Any):
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        # args are always passed, so psycopg always parses the query and %% is a literal %
        return self.conn.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(args))

    def close(self) -> None:
        self.conn.close()


class Postgres:
    name = "postgres"
    begin = "BEGIN"
    migration_lock: str | None = "SELECT pg_advisory_xact_lock(7265726)"  # a fixed number: "parley migrates"
    contains = "strpos(lower({column}), lower(?)) > 0"

    def __init__(self) -> None:
        try:
            import psycopg
        except ImportError:
            raise DialectError("a postgresql:// store needs psycopg: pip install 'psycopg[binary]'") from None
        self.psycopg = psycopg
        self.integrity_error: type[Exception] = psycopg.IntegrityError

    def connect(self, target: str | Path, timeout: float) -> PgConnection:
        conn = self.psycopg.connect(str(target), autocommit=True, connect_timeout=max(1, round(timeout)))
        db = PgConnection(conn)
        db.execute(f"SET lock_timeout = {int(timeout * 1000)}")  # as SQLite's busy timeout
        return db

    def insert(self, db: Connection, sql: str, args: Sequence[Any]) -> int:
        return db.execute(sql + " RETURNING id", args).fetchone()[0]

    @contextmanager
    def migrating(self, db: Connection) -> Iterator[None]:
        yield  # PostgreSQL checks references inside DDL transactions itself

    def check_references(self, db: Connection) -> None:
        pass

    def match(self, query: str) -> Match | None:
        words = query.split()
        if not words:
            return None
        phrases = " || ".join(["phraseto_tsquery('simple', ?)"] * len(words))  # OR of phrases
        source = f"chunks c CROSS JOIN (SELECT {phrases} AS q) AS query"
        vector = "to_tsvector('simple', c.text)"  # the expression the GIN index is built on
        return Match(source, f"{vector} @@ query.q", f"-ts_rank({vector}, query.q)", tuple(words))


def dialect_for(target: str | Path) -> SQLite | Postgres:
    """PostgreSQL for a postgresql:// (or postgres://) URL, SQLite for a file path."""
    if isinstance(target, str) and target.startswith(POSTGRES_SCHEMES):
        return Postgres()
    if isinstance(target, Path) and str(target).startswith(("postgresql:/", "postgres:/")):
        # Path("postgresql://h/db") is "postgresql:/h/db": it would silently be a new SQLite file
        raise DialectError(f"{target} is a Path: pass a postgresql:// URL as a str, not a Path")
    if isinstance(target, Path) or (isinstance(target, str) and target.strip()):
        if "://" in str(target):
            raise DialectError(f"unsupported database URL {target!r}: use postgresql://... or a file path")
        return SQLite()
    raise DialectError(f"a store needs a file path or a postgresql:// URL, not {target!r}")
