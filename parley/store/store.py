"""The conversation store: users, keys, conversations, memory and documents, in one SQLite file
or one PostgreSQL database.

    from parley.store import Store

    with Store("parley.db") as store:
        alice = store.add_user("alice")
        key = store.create_api_key(alice.id)          # shown once; only its sha256 is kept
        assert store.user_for_key(key) == alice
        conv = store.create_conversation(alice.id, "Trip")
        store.add_message(alice.id, conv.id, "user", "Where to in May?")
        store.add_document(alice.id, "notes.txt", "text/plain", ["Lisbon in May", "Oslo in June"])
        hits = store.search_chunks(alice.id, "May", k=5)

Everything a user owns is read, written and deleted through methods that take that user's
id, so isolation between users is enforced here and nowhere else: another user's ids behave
exactly like ids that do not exist (None, False, or ValueError for writes). User and
conversation ids are never reused, so nothing kept under a deleted user's or conversation's
id can reach a later one.

A conversation's rows are `Message`s (a user's message, an assistant's answer); their SQL
table is still called `turns`, as are the `turn_id` columns of traces and feedback and the
HTTP API's "turn" ids: renaming a table is a rebuild migration for no change in behaviour.
The file runs in WAL mode, so readers never wait for a writer and several `Store` objects
(processes, threads) may share it; each `Store` is one connection for one thread.

`Store("postgresql://user@host/dbname")` opens a PostgreSQL database instead, with the same
methods and behaviour; the SQL that differs (ids, full-text search, migrations) is in
`parley.store.dialect`. Search scores differ (bm25 versus ts_rank, lower is better on both),
and vector search stays in numpy on both: embeddings are stored as bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from parley.store.dialect import Connection, dialect_for
from parley.store.schema import MIGRATIONS
from parley.store.schema_pg import PG_MIGRATIONS

ROLES = ("system", "user", "assistant", "tool")
T = TypeVar("T")


class SchemaError(RuntimeError):
    """The database was written by a newer Parley than this one."""


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str
    created_at: str


@dataclass(frozen=True)
class Conversation:
    id: int
    user_id: int
    title: str
    created_at: str
    updated_at: str


@dataclass(frozen=True)
class Message:
    """One message of a conversation (a row of the `turns` table)."""

    id: int
    conversation_id: int
    role: str
    content: str
    created_at: str
    prompt_tokens: int | None
    completion_tokens: int | None
    withdrawn_at: str | None = None  # set when the user regenerated or edited it away (see `withdraw`)
    model: str | None = None  # an answer's: the model that wrote it, e.g. "smollm2, imported 2026-12-05T10:00:00"


@dataclass(frozen=True)
class Feedback:
    id: int
    turn_id: int  # the answer's message id (the column's and the HTTP API's name)
    user_id: int
    rating: int
    edited_text: str | None
    created_at: str
    kind: str = "rating"  # or "regenerated": the user asked for another answer instead (see `withdraw`),
    # or "barge-in": the user spoke over this spoken answer, which stopped it there


@dataclass(frozen=True)
class MemoryFact:
    id: int
    user_id: int
    text: str
    created_at: str
    embedding: bytes | None


@dataclass(frozen=True)
class Document:
    id: int
    user_id: int
    name: str
    mime: str
    sha256: str
    created_at: str
    collection: str = "default"
    source: str | None = None  # where it was read from (a resolved file path), if known


@dataclass(frozen=True)
class ChunkHit:
    chunk_id: int
    document_id: int
    document_name: str
    ord: int
    text: str
    score: float  # bm25 (ts_rank negated on PostgreSQL), lower is better; hits come best first (0 from get_chunks)
    page: int | None = None  # the PDF page the chunk starts on


CONVERSATION = "id, user_id, title, created_at, updated_at"  # a Conversation's columns (not `saved`)
# a Message's columns (not `slots`: the dialogue state an answer left, kept for `withdraw`)
MESSAGE = "id, conversation_id, role, content, created_at, prompt_tokens, completion_tokens, withdrawn_at, model"
LAST_USED_RESOLUTION = 60.0  # seconds: how stale an API key's last_used_at may be
UNSAVED_GRACE = 3600.0  # seconds: a conversation opened for a turn this recently may still get its exchange


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _create_private(path: str | Path) -> None:
    """A new SQLite file, created empty and owner-only (0600) before SQLite opens it: SQLite then
    gives its -wal and -shm files the same mode. An existing file is left as it is."""
    if str(path) == ":memory:" or str(path).startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return  # it exists (left as it is), or no such folder: SQLite's own error says that better
    os.chmod(path, 0o600)  # os.open's mode passes through the umask; make it exact


def _text(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _slots_json(slots: dict[str, Any]) -> str:
    if not isinstance(slots, dict):
        raise ValueError(f"dialogue state must be a dict of slots, not {type(slots).__name__}")
    try:
        return json.dumps(slots)
    except (TypeError, ValueError) as e:
        raise ValueError(f"dialogue state must be JSON-serialisable: {e}") from None


def _entry(entries: Sequence[T] | None, i: int, what: str) -> T | None:
    if entries is None:
        return None
    if i >= len(entries):
        raise ValueError(f"{what} has {len(entries)} entries, fewer than the chunks")
    return entries[i]


def _in_collection(collection: str | None, table: str) -> tuple[str, tuple[str, ...]]:
    """A WHERE clause's extra condition, and its args, keeping only `collection` if named."""
    return (f" AND {table}collection = ?", (collection,)) if collection is not None else ("", ())


class Store:
    def __init__(self, path: str | Path, timeout: float = 5.0):
        """`path`: an SQLite file (created if new) or a postgresql:// URL of an existing
        database. Either is migrated to the current schema on opening."""
        self.dialect = dialect_for(path)
        if self.dialect.name == "sqlite":
            _create_private(path)
        self.db: Connection = self.dialect.connect(path, timeout)
        try:
            self._migrate()
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        self.db.execute(self.dialect.begin)
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _migrate(self) -> None:
        migrations = PG_MIGRATIONS if self.dialect.name == "postgres" else MIGRATIONS
        with self.dialect.migrating(self.db), self._tx() as db:
            if self.dialect.migration_lock:
                db.execute(self.dialect.migration_lock)
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(migrations):
                raise SchemaError(
                    f"database schema version {version} is newer than this Parley knows "
                    f"({len(migrations)}); upgrade Parley to open it"
                )
            for statements in migrations[version:]:
                for sql in statements:
                    db.execute(sql)
            if version < len(migrations):
                self.dialect.check_references(db)
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (len(migrations),))
            else:
                db.execute("UPDATE schema_version SET version = ?", (len(migrations),))

    @property
    def version(self) -> int:
        return self.db.execute("SELECT version FROM schema_version").fetchone()[0]

    def _one(self, cls: type[T], sql: str, args: tuple = ()) -> T | None:
        found = self._all(cls, sql, args)
        return found[0] if found else None

    def _all(self, cls: type[T], sql: str, args: tuple = ()) -> list[T]:
        cur = self.db.execute(sql, args)
        names = [column[0] for column in cur.description]
        return [cls(**dict(zip(names, row))) for row in cur.fetchall()]

    def _insert(self, sql: str, args: tuple) -> int:
        """Run an INSERT (inside a transaction) and return the new row's id."""
        return self.dialect.insert(self.db, sql, args)

    def _exists(self, sql: str, args: tuple) -> bool:
        return self.db.execute(sql, args).fetchone() is not None

    def _require_user(self, user_id: int) -> None:
        if not self._exists("SELECT 1 FROM users WHERE id = ?", (user_id,)):
            raise ValueError(f"unknown user {user_id}")

    def _require_conversation(self, user_id: int, conv_id: int) -> None:
        if not self._exists("SELECT 1 FROM conversations WHERE id = ? AND user_id = ?", (conv_id, user_id)):
            raise ValueError(f"unknown conversation {conv_id}")

    def _require_message(self, user_id: int, message_id: int) -> None:
        sql = "SELECT 1 FROM turns t JOIN conversations c ON c.id = t.conversation_id WHERE t.id = ? AND c.user_id = ?"
        if not self._exists(sql, (message_id, user_id)):
            raise ValueError(f"unknown turn {message_id}")  # "turn": the HTTP API's word for a message id

    # users and keys

    def add_user(self, name: str, role: str = "user") -> User:
        _text(name, "user name")
        if role not in ("user", "admin"):
            raise ValueError(f"role must be 'user' or 'admin', not {role!r}")
        try:
            with self._tx():
                new = self._insert("INSERT INTO users (name, role, created_at) VALUES (?, ?, ?)", (name, role, _now()))
        except self.dialect.integrity_error:
            raise ValueError(f"user {name!r} already exists") from None
        return self.get_user(new)

    def get_user(self, user_id: int) -> User | None:
        return self._one(User, "SELECT id, name, role, created_at FROM users WHERE id = ?", (user_id,))

    def list_users(self) -> list[User]:
        """Every user (for administrators), oldest first."""
        return self._all(User, "SELECT id, name, role, created_at FROM users ORDER BY id")

    def get_user_by_name(self, name: str) -> User | None:
        return self._one(User, "SELECT id, name, role, created_at FROM users WHERE name = ?", (name,))

    def create_api_key(self, user_id: int) -> str:
        """A new key for the user. The plaintext is returned this once and never stored."""
        self._require_user(user_id)
        key = "pk-" + secrets.token_urlsafe(32)
        with self._tx() as db:
            db.execute(
                "INSERT INTO api_keys (user_id, key_hash, created_at) VALUES (?, ?, ?)",
                (user_id, _hash_key(key), _now()),
            )
        return key

    def revoke_keys(self, user_id: int) -> int:
        """Delete every API key of the user (their data stays); how many there were."""
        self._require_user(user_id)
        with self._tx() as db:
            return db.execute("DELETE FROM api_keys WHERE user_id = ?", (user_id,)).rowcount

    def delete_user(self, user_id: int) -> bool:
        """Delete the user and everything they own, in one transaction: keys, conversations with
        their messages, traces, feedback and dialogue state, memory, documents with their chunks
        (the foreign keys cascade), and the knowledge stamp (keyed by user id alone)."""
        with self._tx() as db:
            gone = db.execute("DELETE FROM users WHERE id = ?", (user_id,)).rowcount > 0
            # after the cascade: deleting documents writes a fresh stamp for their owner
            db.execute("DELETE FROM knowledge_stamps WHERE user_id = ?", (user_id,))
        return gone

    def set_trusted(self, user_id: int, trusted: bool) -> None:
        """Mark a user trusted (the default) or not: an untrusted user's feedback never becomes
        training data (parley/learn/feedback.py)."""
        with self._tx() as db:
            if db.execute("UPDATE users SET trusted = ? WHERE id = ?", (int(bool(trusted)), user_id)).rowcount == 0:
                raise ValueError(f"unknown user {user_id}")

    def set_personalized(self, user_id: int, on: bool) -> None:
        """Let a user have an adapter of their own (the default) or not (parley/learn/personal.py;
        opting out also deletes what there is: personal.forget)."""
        with self._tx() as db:
            if db.execute("UPDATE users SET personalize = ? WHERE id = ?", (int(bool(on)), user_id)).rowcount == 0:
                raise ValueError(f"unknown user {user_id}")

    def personalized(self, user_id: int) -> bool:
        row = self.db.execute("SELECT personalize FROM users WHERE id = ?", (user_id,)).fetchone()
        if row is None:
            raise ValueError(f"unknown user {user_id}")
        return bool(row[0])

    def is_trusted(self, user_id: int) -> bool:
        row = self.db.execute("SELECT trusted FROM users WHERE id = ?", (user_id,)).fetchone()
        if row is None:
            raise ValueError(f"unknown user {user_id}")
        return bool(row[0])

    def feedback_rows(self, since: str = "", user_id: int | None = None) -> list[dict[str, Any]]:
        """Every feedback row written after `since` (an ISO time; '' = all), oldest first, with its
        answer, the answer's trace and model, and whether its user is trusted: what `parley learn`
        reads (parley/learn/feedback.py decides what becomes training data)."""
        sql = ("SELECT f.id, f.turn_id, f.user_id, u.name AS user_name, u.trusted, f.rating, f.edited_text, f.kind,"
               " f.created_at, t.conversation_id, t.content AS answer, t.model, t.created_at AS answered_at,"
               " tr.data AS trace FROM feedback f JOIN turns t ON t.id = f.turn_id"
               " JOIN conversations c ON c.id = t.conversation_id AND c.user_id = f.user_id"
               " JOIN users u ON u.id = f.user_id LEFT JOIN traces tr ON tr.turn_id = t.id"
               " WHERE t.role = 'assistant' AND f.created_at > ?" + (" AND f.user_id = ?" if user_id is not None else "")
               + " ORDER BY f.created_at, f.id")
        cur = self.db.execute(sql, (since, user_id) if user_id is not None else (since,))
        names = [column[0] for column in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def history_before(self, message_id: int) -> list[Message]:
        """The messages an answer followed (by id), as its conversation held them when it was
        written: those withdrawn before then left out, withdrawn or not since."""
        sql = (f"SELECT {', '.join('t.' + c for c in MESSAGE.split(', '))} FROM turns t JOIN turns a"
               " ON a.id = ? AND t.conversation_id = a.conversation_id AND t.id < a.id"
               " WHERE t.withdrawn_at IS NULL OR t.withdrawn_at >= a.created_at ORDER BY t.id")
        return self._all(Message, sql, (message_id,))

    def answers_after(self, message_id: int) -> list[Message]:
        """The answers written after this one in its conversation, withdrawn ones too, in order."""
        sql = (f"SELECT {', '.join('t.' + c for c in MESSAGE.split(', '))} FROM turns t JOIN turns a"
               " ON a.id = ? AND t.conversation_id = a.conversation_id AND t.id > a.id"
               " WHERE t.role = 'assistant' ORDER BY t.id")
        return self._all(Message, sql, (message_id,))

    def user_for_key(self, key: str) -> User | None:
        """The key's user, or None. The key's last use is written at most once a minute
        (LAST_USED_RESOLUTION): a server checks the key of every request, and a write per
        request would serialize them all on the database's write lock."""
        # sha256 of a 256-bit random key: an exact index lookup is safe, no slow hash needed
        digest = _hash_key(key)
        row = self.db.execute(
            "SELECT u.id, u.name, u.role, u.created_at, k.last_used_at FROM users u"
            " JOIN api_keys k ON k.user_id = u.id WHERE k.key_hash = ?",
            (digest,),
        ).fetchone()
        if row is None:
            return None
        *fields, last_used = row
        stamp = _now()
        if last_used is None or \
                (datetime.fromisoformat(stamp) - datetime.fromisoformat(last_used)).total_seconds() >= LAST_USED_RESOLUTION:
            with self._tx() as db:
                db.execute("UPDATE api_keys SET last_used_at = ? WHERE key_hash = ?", (stamp, digest))
        return User(*fields)

    # conversations, messages, traces, feedback, dialogue state

    def create_conversation(self, user_id: int, title: str = "New conversation", saved: bool = True) -> Conversation:
        """A new conversation. `saved=False`: a turn opens it, and it counts as abandoned (see
        `drop_unsaved`) until that turn's exchange is written with `add_exchange`."""
        _text(title, "title")
        self._require_user(user_id)
        stamp = _now()
        with self._tx():
            new = self._insert(
                "INSERT INTO conversations (user_id, title, created_at, updated_at, saved) VALUES (?, ?, ?, ?, ?)",
                (user_id, title, stamp, stamp, int(saved)),
            )
        return self.get_conversation(user_id, new)

    def drop_unsaved(self, older_than: float = UNSAVED_GRACE) -> int:
        """Delete every conversation a turn opened more than `older_than` seconds ago but never saved
        an exchange in (the process running the turn was killed); how many. For a server's start:
        the grace keeps the conversation of a turn another process (`parley chat`, a second server)
        is running right now on the same database."""
        cutoff = (datetime.now(timezone.utc) - timedelta(seconds=older_than)).isoformat(timespec="microseconds")
        with self._tx() as db:
            return db.execute("DELETE FROM conversations WHERE saved = 0 AND created_at < ? AND NOT EXISTS"
                              " (SELECT 1 FROM turns t WHERE t.conversation_id = conversations.id)", (cutoff,)).rowcount

    def list_conversations(self, user_id: int) -> list[Conversation]:
        sql = f"SELECT {CONVERSATION} FROM conversations WHERE user_id = ? ORDER BY updated_at DESC, id DESC"
        return self._all(Conversation, sql, (user_id,))

    def get_conversation(self, user_id: int, conv_id: int) -> Conversation | None:
        sql = f"SELECT {CONVERSATION} FROM conversations WHERE id = ? AND user_id = ?"
        return self._one(Conversation, sql, (conv_id, user_id))

    def delete_conversation(self, user_id: int, conv_id: int) -> bool:
        """Delete it with its messages, traces, feedback and dialogue state (foreign-key cascades)."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM conversations WHERE id = ? AND user_id = ?", (conv_id, user_id))
        return cur.rowcount > 0

    def add_message(
        self,
        user_id: int,
        conv_id: int,
        role: str,
        content: str,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> Message:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        _text(content, "message content")
        stamp = _now()
        with self._tx() as db:
            self._require_conversation(user_id, conv_id)
            new = self._insert(
                "INSERT INTO turns (conversation_id, role, content, created_at, prompt_tokens, completion_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (conv_id, role, content, stamp, prompt_tokens, completion_tokens),
            )
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (stamp, conv_id))
        return self._one(Message, f"SELECT {MESSAGE} FROM turns WHERE id = ?", (new,))

    def messages(self, user_id: int, conv_id: int, withdrawn: bool = False) -> list[Message]:
        """The conversation's messages in order; withdrawn ones too only if `withdrawn`."""
        sql = (
            f"SELECT {', '.join('t.' + c for c in MESSAGE.split(', '))} FROM turns t"
            " JOIN conversations c ON c.id = t.conversation_id"
            " WHERE c.id = ? AND c.user_id = ?" + ("" if withdrawn else " AND t.withdrawn_at IS NULL") + " ORDER BY t.id"
        )
        return self._all(Message, sql, (conv_id, user_id))

    def rename_conversation(self, user_id: int, conv_id: int, title: str) -> Conversation | None:
        """Give it a new title (None if it is not the user's); its place in the list stays."""
        _text(title, "title")
        with self._tx() as db:
            db.execute("UPDATE conversations SET title = ? WHERE id = ? AND user_id = ?", (title, conv_id, user_id))
        return self.get_conversation(user_id, conv_id)

    def search_conversations(self, user_id: int, query: str, limit: int = 50) -> list[Conversation]:
        """The user's conversations whose title or any message (withdrawn ones aside) contains
        `query`, ignoring case; newest first, as `list_conversations`."""
        _text(query, "search text")
        pattern = "%" + query.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        sql = (
            f"SELECT {CONVERSATION} FROM conversations c WHERE c.user_id = ? AND (lower(c.title) LIKE ? ESCAPE '\\'"
            " OR EXISTS (SELECT 1 FROM turns t WHERE t.conversation_id = c.id AND t.withdrawn_at IS NULL"
            " AND lower(t.content) LIKE ? ESCAPE '\\')) ORDER BY c.updated_at DESC, c.id DESC LIMIT ?"
        )
        return self._all(Conversation, sql, (user_id, pattern, pattern, limit))

    def withdraw(self, user_id: int, message_id: int, regenerated: bool = False) -> list[Message]:
        """Take a message and every later one out of its conversation's history (the rows stay,
        with `withdrawn_at` set), as when the user edits a question; an answer takes its question
        with it. Returns the withdrawn messages in order. With `regenerated` the message must be
        an answer, kept as a rejected alternative (feedback -1 of kind "regenerated") to the one
        the same question gets next. The dialogue state goes back to what the exchanges left in
        the history left. ValueError for another user's, unknown or withdrawn ids."""
        stamp = _now()
        with self._tx() as db:
            self._require_message(user_id, message_id)
            conv_id, role, gone = db.execute(
                "SELECT conversation_id, role, withdrawn_at FROM turns WHERE id = ?", (message_id,)).fetchone()
            if gone is not None:
                raise ValueError(f"turn {message_id} was withdrawn already")
            if regenerated and role != "assistant":
                raise ValueError(f"turn {message_id} is a {role} message; only an answer can be regenerated")
            start = message_id
            if role == "assistant":
                asked = db.execute("SELECT max(id) FROM turns WHERE conversation_id = ? AND id < ? AND role = 'user'"
                                   " AND withdrawn_at IS NULL", (conv_id, message_id)).fetchone()[0]
                start = asked if asked is not None else message_id
            if regenerated:
                db.execute(
                    "INSERT INTO feedback (turn_id, user_id, rating, edited_text, created_at, kind)"
                    " VALUES (?, ?, -1, NULL, ?, 'regenerated') ON CONFLICT (turn_id, user_id) DO UPDATE SET"
                    " rating = -1, edited_text = NULL, created_at = excluded.created_at, kind = 'regenerated'",
                    (message_id, user_id, stamp))
            db.execute("UPDATE turns SET withdrawn_at = ? WHERE conversation_id = ? AND id >= ? AND withdrawn_at IS NULL",
                       (stamp, conv_id, start))
            if db.execute("SELECT 1 FROM turns WHERE conversation_id = ? AND withdrawn_at = ? AND slots IS NOT NULL",
                          (conv_id, stamp)).fetchone():
                # a withdrawn exchange left the dialogue state: it goes back to what the last
                # exchange still in the history left (none: nothing is carried forward)
                row = db.execute("SELECT slots FROM turns WHERE conversation_id = ? AND role = 'assistant'"
                                 " AND withdrawn_at IS NULL ORDER BY id DESC LIMIT 1", (conv_id,)).fetchone()
                if row and row[0] is not None:
                    self._put_slots(user_id, conv_id, row[0], stamp)
                else:
                    db.execute("DELETE FROM dialogue_state WHERE conversation_id = ?", (conv_id,))
        return self._all(Message, f"SELECT {MESSAGE} FROM turns WHERE conversation_id = ? AND withdrawn_at = ? AND id >= ?"
                         " ORDER BY id", (conv_id, stamp, start))

    def add_exchange(self, user_id: int, conv_id: int, question: str, answer: str,
                     trace: dict[str, Any] | None = None,
                     slots: dict[str, Any] | None = None, model: str | None = None) -> tuple[Message, Message]:
        """A user message, the assistant's answer, the answer's trace and the dialogue state the
        turn leaves (`slots`, when given), in one transaction: after a crash the conversation has
        all of them or none. `model` names what wrote the answer (kept with it)."""
        _text(question, "question")
        _text(answer, "answer")
        data = json.dumps(trace) if trace is not None else None
        state = _slots_json(slots) if slots is not None else None
        stamp = _now()
        with self._tx() as db:
            self._require_conversation(user_id, conv_id)
            ids = [
                self._insert(
                    "INSERT INTO turns (conversation_id, role, content, created_at, model, slots) VALUES (?, ?, ?, ?, ?, ?)",
                    (conv_id, role, content, stamp, by, left),
                )
                for role, content, by, left in (("user", question, None, None), ("assistant", answer, model, state))
            ]
            if data is not None:
                db.execute("INSERT INTO traces (turn_id, data) VALUES (?, ?)", (ids[1], data))
            if state is not None:
                self._put_slots(user_id, conv_id, state, stamp)
            db.execute("UPDATE conversations SET updated_at = ?, saved = 1 WHERE id = ?", (stamp, conv_id))
        asked, answered = (self._one(Message, f"SELECT {MESSAGE} FROM turns WHERE id = ?", (i,)) for i in ids)
        return asked, answered

    def get_slots(self, user_id: int, conv_id: int) -> dict[str, Any]:
        """The dialogue state carried into the conversation's next turn ({} if none, or if the
        conversation is not the user's)."""
        row = self.db.execute("SELECT slots FROM dialogue_state WHERE conversation_id = ? AND user_id = ?",
                              (conv_id, user_id)).fetchone()
        return json.loads(row[0]) if row else {}

    def set_slots(self, user_id: int, conv_id: int, slots: dict[str, Any]) -> None:
        """Replace the conversation's dialogue state (a JSON object)."""
        state = _slots_json(slots)
        with self._tx():
            self._require_conversation(user_id, conv_id)
            self._put_slots(user_id, conv_id, state, _now())

    def _put_slots(self, user_id: int, conv_id: int, state: str, stamp: str) -> None:
        self.db.execute(
            "INSERT INTO dialogue_state (conversation_id, user_id, slots, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (conversation_id) DO UPDATE SET slots = excluded.slots, updated_at = excluded.updated_at",
            (conv_id, user_id, state, stamp),
        )

    def add_trace(self, user_id: int, message_id: int, trace: dict[str, Any]) -> None:
        """Attach (or replace) the JSON trace of how an answer was produced."""
        data = json.dumps(trace)
        with self._tx() as db:
            self._require_message(user_id, message_id)
            db.execute(
                "INSERT INTO traces (turn_id, data) VALUES (?, ?)"
                " ON CONFLICT (turn_id) DO UPDATE SET data = excluded.data",
                (message_id, data),
            )

    def get_trace(self, user_id: int, message_id: int) -> dict[str, Any] | None:
        sql = (
            "SELECT tr.data FROM traces tr JOIN turns t ON t.id = tr.turn_id"
            " JOIN conversations c ON c.id = t.conversation_id WHERE tr.turn_id = ? AND c.user_id = ?"
        )
        row = self.db.execute(sql, (message_id, user_id)).fetchone()
        return json.loads(row[0]) if row else None

    def add_feedback(self, user_id: int, message_id: int, rating: int, edited_text: str | None = None,
                     kind: str = "rating") -> Feedback:
        """Rate an answer +1 or -1, optionally with a corrected text; rating again replaces it.
        `kind` "barge-in" records that the user spoke over the answer (the voice route gives
        it -1: the answer went on longer than the user wanted to hear)."""
        if rating not in (1, -1) or isinstance(rating, bool):
            raise ValueError(f"rating must be +1 or -1, not {rating!r}")
        if kind not in ("rating", "barge-in"):  # "regenerated" is written by `withdraw`
            raise ValueError(f"feedback kind must be 'rating' or 'barge-in', not {kind!r}")
        if edited_text is not None:
            _text(edited_text, "edited text")
        with self._tx() as db:
            self._require_message(user_id, message_id)
            db.execute(
                "INSERT INTO feedback (turn_id, user_id, rating, edited_text, created_at, kind)"
                " VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (turn_id, user_id) DO UPDATE SET rating = excluded.rating,"
                " edited_text = excluded.edited_text, created_at = excluded.created_at, kind = excluded.kind",
                (message_id, user_id, rating, edited_text, _now(), kind),
            )
        return self.get_feedback(user_id, message_id)

    def get_feedback(self, user_id: int, message_id: int) -> Feedback | None:
        sql = "SELECT * FROM feedback WHERE turn_id = ? AND user_id = ?"
        return self._one(Feedback, sql, (message_id, user_id))

    # long-term memory

    def add_memory(self, user_id: int, text: str, embedding: bytes | None = None) -> MemoryFact:
        _text(text, "memory text")
        self._require_user(user_id)
        with self._tx():
            new = self._insert(
                "INSERT INTO memory_facts (user_id, text, created_at, embedding) VALUES (?, ?, ?, ?)",
                (user_id, text, _now(), embedding),
            )
        return self._one(MemoryFact, "SELECT * FROM memory_facts WHERE id = ?", (new,))

    def list_memory(self, user_id: int) -> list[MemoryFact]:
        return self._all(MemoryFact, "SELECT * FROM memory_facts WHERE user_id = ? ORDER BY id", (user_id,))

    def delete_memory(self, user_id: int, fact_id: int) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM memory_facts WHERE id = ? AND user_id = ?", (fact_id, user_id))
        return cur.rowcount > 0

    def search_memory_text(self, user_id: int, query: str, limit: int = 20) -> list[MemoryFact]:
        """Facts containing `query`, case-insensitively (ASCII); not LIKE, so % and _ are literal."""
        _text(query, "query")
        contains = self.dialect.contains.format(column="text")
        sql = f"SELECT * FROM memory_facts WHERE user_id = ? AND {contains} ORDER BY id LIMIT ?"
        return self._all(MemoryFact, sql, (user_id, query, limit))

    # documents and retrieval

    def add_document(
        self,
        user_id: int,
        name: str,
        mime: str,
        chunks: Iterable[str],
        *,
        collection: str = "default",
        source: str | None = None,
        sha256: str | None = None,
        pages: Sequence[int | None] | None = None,
        embeddings: Sequence[bytes] | None = None,
        replaces: int | None = None,
    ) -> int:
        """Store a document and its chunks in one transaction: any failure, including a bad
        chunk halfway through, leaves nothing behind. Returns the document id.

        `pages` and `embeddings`, when given, hold one entry per chunk (its PDF page or None;
        its float32 vector as bytes). `sha256` (of the source file, say) is stored instead of
        the hash of the chunk text. `replaces` is the id of an older version of this document,
        deleted in the same transaction."""
        _text(name, "document name")
        _text(mime, "mime type")
        _text(collection, "collection")
        self._require_user(user_id)
        digest = hashlib.sha256()
        with self._tx() as db:
            if replaces is not None:
                old = db.execute("DELETE FROM documents WHERE id = ? AND user_id = ?", (replaces, user_id))
                if old.rowcount == 0:
                    raise ValueError(f"unknown document {replaces}")
            doc_id = self._insert(
                "INSERT INTO documents (user_id, name, mime, sha256, created_at, collection, source)"
                " VALUES (?, ?, ?, '', ?, ?, ?)",
                (user_id, name, mime, _now(), collection, source),
            )
            count = 0
            for count, text in enumerate(chunks, 1):
                i = count - 1
                _text(text, f"chunk {i}")
                digest.update(text.encode())
                page = _entry(pages, i, "pages")
                vector = _entry(embeddings, i, "embeddings")
                db.execute(
                    "INSERT INTO chunks (document_id, ord, text, page, embedding) VALUES (?, ?, ?, ?, ?)",
                    (doc_id, i, text, page, vector),
                )
            if count == 0:
                raise ValueError("a document needs at least one chunk")
            for what, entries in (("pages", pages), ("embeddings", embeddings)):
                if entries is not None and len(entries) != count:
                    raise ValueError(f"{what} has {len(entries)} entries for {count} chunks")
            # the hash of the text (chunks concatenated), known only once all are read
            db.execute("UPDATE documents SET sha256 = ? WHERE id = ?", (sha256 or digest.hexdigest(), doc_id))
        return doc_id

    def list_documents(self, user_id: int, collection: str | None = None) -> list[Document]:
        """The user's documents, oldest first; only those in `collection` if one is named."""
        where, args = _in_collection(collection, "")
        return self._all(Document, f"SELECT * FROM documents WHERE user_id = ?{where} ORDER BY id", (user_id, *args))

    def delete_document(self, user_id: int, doc_id: int) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM documents WHERE id = ? AND user_id = ?", (doc_id, user_id))
        return cur.rowcount > 0

    def search_chunks(self, user_id: int, query: str, k: int = 5, collection: str | None = None) -> list[ChunkHit]:
        """The user's k best chunks for `query` by BM25 (only `collection`'s, if one is named).
        Any text is a valid query."""
        match = self.dialect.match(query)
        if match is None:
            return []
        where, args = _in_collection(collection, "d.")
        sql = (
            "SELECT c.id AS chunk_id, c.document_id, d.name AS document_name, c.ord, c.text,"
            f" {match.score} AS score, c.page FROM {match.source} JOIN documents d ON d.id = c.document_id"
            f" WHERE {match.condition} AND d.user_id = ?{where} ORDER BY score, c.id LIMIT ?"
        )
        return self._all(ChunkHit, sql, (*match.args, user_id, *args, k))

    def get_chunks(self, user_id: int, chunk_ids: Sequence[int]) -> list[ChunkHit]:
        """The user's chunks with these ids, in the order asked (others' ids are left out)."""
        if not chunk_ids:
            return []
        sql = (
            "SELECT c.id AS chunk_id, c.document_id, d.name AS document_name, c.ord, c.text, 0.0 AS score, c.page"
            " FROM chunks c JOIN documents d ON d.id = c.document_id"
            f" WHERE d.user_id = ? AND c.id IN ({', '.join('?' * len(chunk_ids))})"
        )
        found = {hit.chunk_id: hit for hit in self._all(ChunkHit, sql, (user_id, *chunk_ids))}
        return [found[i] for i in chunk_ids if i in found]

    def chunk_embeddings(self, user_id: int, collection: str | None = None) -> list[tuple[int, bytes]]:
        """(chunk id, embedding bytes) of the user's chunks that have one, by id."""
        where, args = _in_collection(collection, "d.")
        sql = (
            "SELECT c.id, c.embedding FROM chunks c JOIN documents d ON d.id = c.document_id"
            f" WHERE d.user_id = ?{where} AND c.embedding IS NOT NULL ORDER BY c.id"
        )
        return [(row[0], row[1]) for row in self.db.execute(sql, (user_id, *args))]

    def knowledge_stamp(self, user_id: int) -> str | None:
        """A token that changes whenever the user's documents or chunks change (None before the
        first document): a cache of their vectors is fresh while the token is the same."""
        row = self.db.execute("SELECT stamp FROM knowledge_stamps WHERE user_id = ?", (user_id,)).fetchone()
        return row[0] if row else None
