"""The conversation store on real SQLite files and a real PostgreSQL server: schema,
isolation, atomicity, search, concurrent connections. Every test runs on both databases."""

import sqlite3
import threading
from pathlib import Path

import pytest
from pg import pg_server, store_target  # noqa: F401 (store_target is a fixture)

import parley.store.store as store_module
from parley.store import SchemaError, Store
from parley.store.store import Conversation
from parley.store.dialect import DialectError
from parley.store.schema import MIGRATIONS
from parley.store.schema_pg import PG_MIGRATIONS


def on_postgres(target) -> bool:
    return isinstance(target, str)


@pytest.fixture
def path(store_target):
    return store_target


@pytest.fixture
def store(path):
    with Store(path) as s:
        yield s


def count(store: Store, table: str) -> int:
    return store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def fts_consistent(store: Store) -> None:
    # the index keeps one docsize row per indexed chunk; a stale entry would show here (the
    # FTS5 integrity-check does not compare against external content on SQLite < 3.44).
    # PostgreSQL's index is on an expression of chunks.text, so it has no rows of its own.
    if store.dialect.name == "sqlite":
        assert count(store, "chunks_fts_docsize") == count(store, "chunks")


def columns(store: Store) -> dict[str, list[str]]:
    if store.dialect.name == "sqlite":
        tables = [r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: [r[1] for r in store.db.execute(f"PRAGMA table_info({t})")] for t in tables}
    rows = store.db.execute("SELECT table_name, column_name FROM information_schema.columns"
                            " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position")
    found: dict[str, list[str]] = {}
    for table, column in rows:
        found.setdefault(table, []).append(column)
    return found


def test_migrates_an_empty_file(store):
    assert store.version == len(MIGRATIONS) == len(PG_MIGRATIONS)
    tables = set(columns(store))
    assert {"users", "api_keys", "conversations", "turns", "traces", "feedback"} <= tables
    assert {"memory_facts", "documents", "chunks", "schema_version", "knowledge_stamps"} <= tables
    if store.dialect.name == "sqlite":
        assert "chunks_fts" in tables
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    else:
        indexes = {r[0] for r in store.db.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'chunks'")}
        assert "chunks_fts" in indexes


def test_both_databases_have_the_same_tables_and_columns(tmp_path):
    server = pg_server()
    name = server.create_database()
    try:
        with Store(tmp_path / "parley.db") as lite, Store(server.url(name)) as pg:
            expected = {t: c for t, c in columns(lite).items() if not t.startswith(("chunks_fts", "sqlite_"))}
            assert columns(pg) == expected
    finally:
        server.drop_database(name)


def test_a_target_that_is_no_database_is_refused():
    for target in ("mysql://localhost/parley", "", 42, Path("postgresql://localhost/parley")):
        with pytest.raises(DialectError, match="file path or a postgresql://|unsupported|not a Path"):
            Store(target)


def test_reopen_keeps_data(path):
    with Store(path) as s:
        conv = s.create_conversation(s.add_user("ann").id, "hello")
    with Store(path) as s:
        ann = s.get_user_by_name("ann")
        assert s.list_conversations(ann.id) == [conv]
        assert s.version == len(MIGRATIONS)


def test_stores_opened_at_once_migrate_a_new_database_once(path):
    errors: list[Exception] = []

    def open_store() -> None:
        try:
            with Store(path) as s:
                assert s.version == len(MIGRATIONS)
        except Exception as e:  # noqa: BLE001 (reported below, from the main thread)
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store(path) as s:
        assert s.db.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1


def test_newer_schema_is_refused(path):
    with Store(path) as s:  # outside a transaction a statement commits at once, on both
        s.db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(SchemaError, match="newer"):
        Store(path)


def test_new_migrations_apply_on_reopen_and_fail_whole(path, monkeypatch):
    with Store(path) as s:
        s.add_user("ann")
    if on_postgres(path):
        import psycopg

        name, migrations, error = "PG_MIGRATIONS", PG_MIGRATIONS, psycopg.errors.SyntaxError
    else:
        name, migrations, error = "MIGRATIONS", MIGRATIONS, sqlite3.OperationalError
    bad = migrations + [("CREATE TABLE tags (name TEXT)", "THIS IS NOT SQL")]
    monkeypatch.setattr(store_module, name, bad)
    with pytest.raises(error):
        Store(path)
    good = migrations + [("CREATE TABLE tags (name TEXT)", "INSERT INTO tags VALUES ('x')")]
    monkeypatch.setattr(store_module, name, good)
    with Store(path) as s:  # the failed attempt left no half-made tags table behind
        assert s.version == len(MIGRATIONS) + 1
        assert count(s, "tags") == 1
        assert s.get_user_by_name("ann") is not None


def test_users_cannot_see_or_touch_each_others_data(store):
    a, b = store.add_user("ann").id, store.add_user("bob").id
    conv = store.create_conversation(a, "secret plans")
    turn = store.add_message(a, conv.id, "user", "the treasure is under the oak")
    store.add_trace(a, turn.id, {"model": "tiny"})
    store.add_feedback(a, turn.id, 1)
    fact = store.add_memory(a, "ann likes oak trees")
    doc = store.add_document(a, "map.txt", "text/plain", ["the oak tree marks the treasure"])

    assert store.get_conversation(b, conv.id) is None
    assert store.list_conversations(b) == []
    assert store.messages(b, conv.id) == []
    assert store.get_trace(b, turn.id) is None
    assert store.list_memory(b) == [] and store.search_memory_text(b, "oak") == []
    assert store.list_documents(b) == [] and store.search_chunks(b, "oak") == []
    for write in (
        lambda: store.add_message(b, conv.id, "user", "mine now"),
        lambda: store.add_trace(b, turn.id, {}),
        lambda: store.add_feedback(b, turn.id, -1),
    ):
        with pytest.raises(ValueError, match="unknown"):
            write()
    assert not store.delete_conversation(b, conv.id)
    assert not store.delete_memory(b, fact.id)
    assert not store.delete_document(b, doc)

    assert store.get_conversation(a, conv.id).title == "secret plans"
    assert [t.content for t in store.messages(a, conv.id)] == ["the treasure is under the oak"]
    assert store.get_trace(a, turn.id) == {"model": "tiny"}
    assert store.get_feedback(a, turn.id).rating == 1
    assert store.list_memory(a) == [fact]
    assert [h.document_id for h in store.search_chunks(a, "oak")] == [doc]


def test_api_key_is_hashed_at_rest(path):
    with Store(path) as s:
        ann = s.add_user("ann", role="admin")
        key = s.create_api_key(ann.id)
        assert s.user_for_key(key) == ann
        assert s.user_for_key(key + "x") is None
        assert s.db.execute("SELECT last_used_at FROM api_keys").fetchone()[0] is not None
        rows = s.db.execute("SELECT * FROM api_keys").fetchall()
    assert len(rows) == 1 and key not in repr(rows)
    if not on_postgres(path):
        files = list(path.parent.glob(path.name + "*"))  # the db and any WAL/shm left behind
        assert all(key.encode() not in f.read_bytes() for f in files)


def test_a_keys_last_use_is_written_at_most_once_a_minute(store):
    ann = store.add_user("ann")
    key = store.create_api_key(ann.id)
    last_used = lambda: store.db.execute("SELECT last_used_at FROM api_keys").fetchone()[0]
    assert last_used() is None
    assert store.user_for_key(key) == ann
    first = last_used()
    assert first is not None
    assert store.user_for_key(key) == ann and last_used() == first  # a second later: no write
    store.db.execute("UPDATE api_keys SET last_used_at = ?", ("2026-01-01T00:00:00.000000+00:00",))
    assert store.user_for_key(key) == ann and last_used() > first  # stale: written again


def test_document_insert_is_atomic(store):
    ann = store.add_user("ann").id

    def failing_chunks():
        yield "first chunk about rivers"
        yield "second chunk about rivers"
        raise OSError("disk read failed while chunking")

    with pytest.raises(OSError):
        store.add_document(ann, "a.txt", "text/plain", failing_chunks())
    with pytest.raises(ValueError, match="chunk 2"):
        store.add_document(ann, "b.txt", "text/plain", ["rivers", "more rivers", "  "])
    with pytest.raises(ValueError, match="at least one chunk"):
        store.add_document(ann, "c.txt", "text/plain", [])
    assert count(store, "documents") == count(store, "chunks") == 0
    assert store.search_chunks(ann, "rivers") == []
    fts_consistent(store)


def test_search_finds_and_ranks(store):
    ann = store.add_user("ann").id
    doc = store.add_document(
        ann,
        "energy.md",
        "text/markdown",
        ["Solar panels turn light into power.", "Wind turbines need wind.", "Panels of judges."],
    )
    store.add_document(ann, "other.md", "text/markdown", ["Nothing relevant here."])
    hits = store.search_chunks(ann, "solar panels", k=5)
    assert [h.ord for h in hits] == [0, 2]  # both words beat one word
    assert hits[0].document_id == doc and hits[0].document_name == "energy.md"
    assert hits[0].score < hits[1].score
    assert len(store.search_chunks(ann, "solar panels", k=1)) == 1
    assert store.search_chunks(ann, "volcano") == []


@pytest.mark.parametrize(
    "query", ['"', 'say "hi', "AND", "OR NOT", "a*", "col:umn", "(", "NEAR(a b)", "-x", "^start", "", "  ", "C++"]
)
def test_search_accepts_any_text(store, query):
    ann = store.add_user("ann").id
    store.add_document(ann, "c.txt", "text/plain", ['C++ and "quotes" AND operators'])
    store.search_chunks(ann, query)


def test_deletes_cascade(store):
    ann = store.add_user("ann").id
    conv = store.create_conversation(ann, "t")
    for text in ("hi", "hello"):
        turn = store.add_message(ann, conv.id, "assistant", text, prompt_tokens=3, completion_tokens=1)
        store.add_trace(ann, turn.id, {"steps": [1, 2]})
        store.add_feedback(ann, turn.id, -1, edited_text="hey")
    doc = store.add_document(ann, "d.txt", "text/plain", ["one", "two"])
    assert store.delete_conversation(ann, conv.id)
    assert store.delete_document(ann, doc)
    for table in ("conversations", "turns", "traces", "feedback", "documents", "chunks"):
        assert count(store, table) == 0, table
    fts_consistent(store)
    assert store.search_chunks(ann, "one") == []


def test_bad_input_is_a_value_error(store):
    ann = store.add_user("ann").id
    conv = store.create_conversation(ann)
    turn = store.add_message(ann, conv.id, "user", "hi")
    cases = [
        (lambda: store.add_user("ann"), "already exists"),
        (lambda: store.add_user("x", role="root"), "role"),
        (lambda: store.add_message(ann, conv.id, "user", ""), "non-empty"),
        (lambda: store.add_message(ann, conv.id, "narrator", "hi"), "role"),
        (lambda: store.add_message(ann, 999, "user", "hi"), "unknown conversation"),
        (lambda: store.add_feedback(ann, turn.id, 2), "rating"),
        (lambda: store.add_feedback(ann, turn.id, True), "rating"),
        (lambda: store.add_memory(999, "x"), "unknown user"),
        (lambda: store.create_api_key(999), "unknown user"),
        (lambda: store.add_memory(ann, " "), "non-empty"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_memory_text_search_is_literal(store):
    ann = store.add_user("ann").id
    store.add_memory(ann, "Prefers 100% dark chocolate", embedding=b"\x00\x01")
    store.add_memory(ann, "Lives in Oslo")
    assert [f.text for f in store.search_memory_text(ann, "100%")] == ["Prefers 100% dark chocolate"]
    assert store.search_memory_text(ann, "_") == []
    assert store.list_memory(ann)[0].embedding == b"\x00\x01"


def test_two_stores_share_one_file(path):
    with Store(path) as first, Store(path) as second:
        ann = first.add_user("ann").id
        conv = first.create_conversation(ann, "shared")
        with first._tx() as db:  # a writer mid-transaction does not block a reader (WAL, MVCC)
            db.execute("UPDATE conversations SET title = 'renamed' WHERE id = ?", (conv.id,))
            assert second.get_conversation(ann, conv.id).title == "shared"
        assert second.get_conversation(ann, conv.id).title == "renamed"

    def write_turns(n: int) -> None:
        with Store(path) as own:  # one connection per thread
            for i in range(n):
                own.add_message(ann, conv.id, "user", f"turn {i}")

    threads = [threading.Thread(target=write_turns, args=(25,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Store(path) as s:
        assert len(s.messages(ann, conv.id)) == 50


def test_add_exchange_is_one_transaction(path):
    with Store(path) as store:
        uid = store.add_user("u").id
        conv = store.create_conversation(uid)
        asked, answered = store.add_exchange(uid, conv.id, "hi", "hello!", {"stages": []})
        assert (asked.role, answered.role) == ("user", "assistant")
        assert store.get_trace(uid, answered.id) == {"stages": []}
        with pytest.raises(TypeError):  # a trace that is not JSON: nothing of the exchange is stored
            store.add_exchange(uid, conv.id, "again", "answer", {"bad": object()})
        with pytest.raises(ValueError, match="answer"):
            store.add_exchange(uid, conv.id, "again", "  ")
        other = store.add_user("other").id
        with pytest.raises(ValueError):
            store.add_exchange(other, conv.id, "mine?", "no")
        assert [t.content for t in store.messages(uid, conv.id)] == ["hi", "hello!"]


def test_an_answer_keeps_the_model_that_wrote_it(path):
    with Store(path) as store:
        uid = store.add_user("u").id
        conv = store.create_conversation(uid)
        store.add_exchange(uid, conv.id, "hi", "hello!", model="smollm2, imported 2026-12-01T09:00:00")
        store.add_exchange(uid, conv.id, "and?", "that is all")  # a caller that does not say
        assert [m.model for m in store.messages(uid, conv.id)] == [None, "smollm2, imported 2026-12-01T09:00:00",
                                                                    None, None]


def test_withdrawing_exchanges_puts_the_dialogue_state_back(path):
    """Regenerate or edit withdraws exchanges: what they put into the dialogue state goes with
    them, and the state is what the exchanges left in the history left."""
    with Store(path) as store:
        uid = store.add_user("u").id
        conv = store.create_conversation(uid)
        store.add_exchange(uid, conv.id, "mail me at a@example.org", "ok", slots={"email": "a@example.org"})
        _, second = store.add_exchange(uid, conv.id, "born 2001-02-03", "noted",
                                       slots={"email": "a@example.org", "date": "2001-02-03"})
        _, third = store.add_exchange(uid, conv.id, "thanks", "welcome")  # left the state alone
        store.withdraw(uid, third.id, regenerated=True)
        assert store.get_slots(uid, conv.id) == {"email": "a@example.org", "date": "2001-02-03"}
        store.withdraw(uid, second.id, regenerated=True)
        assert store.get_slots(uid, conv.id) == {"email": "a@example.org"}
        first_question = store.messages(uid, conv.id)[0]
        store.withdraw(uid, first_question.id)  # an edit of the first question: nothing is left
        assert store.get_slots(uid, conv.id) == {} and store.messages(uid, conv.id) == []


def test_dialogue_state_is_per_user_and_conversation_and_goes_with_either(path):
    with Store(path) as store:
        ann, bob = store.add_user("ann").id, store.add_user("bob").id
        first, second = store.create_conversation(ann, "a"), store.create_conversation(ann, "b")
        store.add_exchange(ann, first.id, "mail me at ann@example.org", "ok", slots={"email": "ann@example.org"})
        store.set_slots(ann, second.id, {"date": "2026-03-14"})
        with pytest.raises(ValueError, match="unknown conversation"):
            store.set_slots(bob, first.id, {"email": "bob@example.org"})  # not bob's: like an id that does not exist
        with pytest.raises(ValueError, match="JSON"):
            store.set_slots(ann, first.id, {"when": object()})
    with Store(path) as store:  # survives a restart
        assert store.get_slots(ann, first.id) == {"email": "ann@example.org"}
        assert store.get_slots(ann, second.id) == {"date": "2026-03-14"}
        assert store.get_slots(bob, first.id) == {}
        assert store.delete_conversation(ann, first.id)
        assert store.get_slots(ann, first.id) == {} and count(store, "dialogue_state") == 1
        store.db.execute("DELETE FROM users WHERE id = ?", (ann,))  # no method deletes users yet: the cascade does
        assert count(store, "dialogue_state") == 0


def test_conversation_ids_are_never_reused(path):
    with Store(path) as store:
        ann = store.add_user("ann").id
        kept = store.create_conversation(ann, "kept")
        last = store.create_conversation(ann, "deleted")
        store.set_slots(ann, last.id, {"email": "ann@example.org"})
        assert store.delete_conversation(ann, last.id)
    with Store(path) as store:  # not even after a restart
        bob = store.add_user("bob").id
        fresh = store.create_conversation(bob, "new")
        assert fresh.id > last.id > kept.id
        assert store.get_slots(bob, fresh.id) == {}


def test_the_conversations_rebuild_keeps_rows_ids_and_references(path, monkeypatch):
    """A database made before migration 3 (conversation ids that could be reused) keeps every
    conversation, message, trace and feedback, and the cascades still work afterwards."""
    name = "PG_MIGRATIONS" if on_postgres(path) else "MIGRATIONS"
    migrations = PG_MIGRATIONS if on_postgres(path) else MIGRATIONS
    monkeypatch.setattr(store_module, name, migrations[:2])
    with Store(path) as old:  # rows as version 2 wrote them: today's methods write later columns
        assert old.version == 2
        ann = old.add_user("ann").id
        convs = [old._one(Conversation, "SELECT * FROM conversations WHERE id = ?", (_insert_v2(old, ann, i),))
                 for i in range(3)]
    monkeypatch.setattr(store_module, name, migrations)
    with Store(path) as store:
        assert store.version == len(MIGRATIONS)
        assert [c.id for c in store.list_conversations(ann)] == sorted((c.id for c in convs), reverse=True)
        assert (count(store, "turns"), count(store, "traces"), count(store, "feedback")) == (6, 3, 3)
        if store.dialect.name == "sqlite":
            sql = store.db.execute("SELECT sql FROM sqlite_master WHERE name = 'conversations'").fetchone()[0]
            assert "AUTOINCREMENT" in sql and store.db.execute("PRAGMA foreign_key_check").fetchall() == []
            assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # back on after migrating
        assert store.delete_conversation(ann, convs[-1].id)  # the cascades still reach the new table
        assert (count(store, "turns"), count(store, "traces"), count(store, "feedback")) == (4, 2, 2)
        assert store.create_conversation(ann, "new").id > convs[-1].id


def _insert_v2(store: Store, user_id: int, i: int) -> int:
    """A conversation with one exchange, its trace and feedback, in version 2's columns."""
    with store._tx() as db:
        conv = store._insert("INSERT INTO conversations (user_id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                             (user_id, f"c{i}", "2026-01-01", "2026-01-01"))
        asked, answer = (store._insert("INSERT INTO turns (conversation_id, role, content, created_at)"
                                       " VALUES (?, ?, ?, ?)", (conv, role, text, "2026-01-01"))
                         for role, text in (("user", "q"), ("assistant", "a")))
        db.execute("INSERT INTO traces (turn_id, data) VALUES (?, ?)", (answer, '{"stages": []}'))
        db.execute("INSERT INTO feedback (turn_id, user_id, rating, created_at) VALUES (?, ?, 1, ?)",
                   (answer, user_id, "2026-01-01"))
    return conv


def test_user_ids_are_never_reused(path):
    """Finding 1 of issue 15: a new user never gets a deleted user's id, so nothing kept under
    that id (a vector cache, a rate-limit bucket, a client's notes) can reach them."""
    with Store(path) as store:
        ann = store.add_user("ann").id
        last = store.add_user("zed").id
        assert store.delete_user(last)
    with Store(path) as store:  # not even after a restart
        fresh = store.add_user("bob").id
        assert fresh > last > ann


def test_the_users_rebuild_keeps_rows_ids_and_references(path, monkeypatch):
    """A database made before migration 4 keeps its users, their ids and everything that refers
    to them; the cascades still work; from then on no id is reused."""
    name = "PG_MIGRATIONS" if on_postgres(path) else "MIGRATIONS"
    migrations = PG_MIGRATIONS if on_postgres(path) else MIGRATIONS
    monkeypatch.setattr(store_module, name, migrations[:3])
    with Store(path) as old:
        ids = [old.add_user(n).id for n in ("ann", "bob", "cid")]
        with old._tx():
            old._insert("INSERT INTO conversations (user_id, title, created_at, updated_at) VALUES (?, ?, ?, ?)",
                        (ids[1], "c", "2026-01-01", "2026-01-01"))
        key = old.create_api_key(ids[1])
        old.add_memory(ids[1], "bob likes tea")
        assert old.delete_user(ids[2])
    monkeypatch.setattr(store_module, name, migrations)
    with Store(path) as store:
        assert [u.id for u in store.list_users()] == ids[:2] and store.user_for_key(key).id == ids[1]
        assert [c.title for c in store.list_conversations(ids[1])] == ["c"]
        if store.dialect.name == "sqlite":
            sql = store.db.execute("SELECT sql FROM sqlite_master WHERE name = 'users'").fetchone()[0]
            assert "AUTOINCREMENT" in sql and store.db.execute("PRAGMA foreign_key_check").fetchall() == []
            assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert store.delete_user(ids[1])  # the cascades reach the new table
        assert (count(store, "conversations"), count(store, "memory_facts"), count(store, "api_keys")) == (0, 0, 0)
        dee = store.add_user("dee").id  # ids freed before the migration left no trace to skip them by
        assert store.delete_user(dee) and store.add_user("eve").id > dee


def test_a_conversation_a_turn_opened_and_never_saved_is_dropped(path):
    """Finding 8: a conversation opened for a turn whose process died before the exchange was
    written is dropped by `drop_unsaved` (a server's start); saved ones, empty ones opened
    otherwise, and one a turn in another process opened moments ago stay."""
    with Store(path) as store:
        ann = store.add_user("ann").id
        dead = store.create_conversation(ann, "killed mid-turn", saved=False)
        done = store.create_conversation(ann, "answered", saved=False)
        store.add_exchange(ann, done.id, "q", "a")
        empty = store.create_conversation(ann, "made empty on purpose")
        assert store.drop_unsaved() == 0  # within the grace: `parley chat` may be running that turn now
        assert dead.id in {c.id for c in store.list_conversations(ann)}
        assert store.drop_unsaved(older_than=0) == 1
        assert {c.id for c in store.list_conversations(ann)} == {done.id, empty.id} and dead.id not in \
            {c.id for c in store.list_conversations(ann)}
