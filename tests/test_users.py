"""Operators manage who may use the server: revoking a user's keys keeps their data, deleting a
user removes everything they owned and nothing of anyone else's. On SQLite and PostgreSQL."""

import io

import pytest
from pg import pg_server, store_target  # noqa: F401 (store_target is a fixture)

from parley.serve.main import users_main
from parley.store import Store

TABLES = ("api_keys", "conversations", "turns", "traces", "feedback", "memory_facts", "documents", "chunks",
          "dialogue_state", "knowledge_stamps")


def fill(store: Store, name: str) -> tuple[int, str]:
    """A user who owns one of everything; their id and API key."""
    user = store.add_user(name)
    key = store.create_api_key(user.id)
    conv = store.create_conversation(user.id, f"{name}'s chat").id
    store.add_exchange(user.id, conv, "my email is x@example.org", "noted", {"stages": []},
                       slots={"email": "x@example.org"})
    answer = store.messages(user.id, conv)[-1].id
    store.add_feedback(user.id, answer, 1)
    store.add_memory(user.id, f"{name} likes tea")
    store.add_document(user.id, f"{name}.txt", "text/plain", [f"{name}'s notes"])
    return user.id, key


def owned(store: Store, user_id: int) -> dict[str, int]:
    """Rows of each table that belong to the user (directly, or through what they own)."""
    through = {"turns": "conversation_id IN (SELECT id FROM conversations WHERE user_id = ?)",
               "traces": "turn_id IN (SELECT t.id FROM turns t JOIN conversations c ON c.id = t.conversation_id"
                         " WHERE c.user_id = ?)",
               "chunks": "document_id IN (SELECT id FROM documents WHERE user_id = ?)"}
    return {t: store.db.execute(f"SELECT count(*) FROM {t} WHERE {through.get(t, 'user_id = ?')}",
                                (user_id,)).fetchone()[0] for t in TABLES}


def test_revoke_keeps_data_and_delete_removes_only_that_users(store_target):
    with Store(store_target) as store:
        ann, ann_key = fill(store, "ann")
        bob, bob_key = fill(store, "bob")
        assert all(owned(store, ann).values()) and all(owned(store, bob).values())  # the check has teeth

        assert store.revoke_keys(ann) == 1
        assert store.user_for_key(ann_key) is None
        assert owned(store, ann)["api_keys"] == 0 and owned(store, ann)["conversations"] == 1

        assert store.delete_user(ann) and not store.delete_user(ann)
        assert store.get_user(ann) is None
        assert set(owned(store, ann).values()) == {0}
        before = owned(store, bob)
        assert all(before.values()) and store.user_for_key(bob_key).name == "bob"


def test_the_users_command_revokes_and_deletes(tmp_path):
    db = str(tmp_path / "p.db")
    with Store(db) as store:
        _, key = fill(store, "ann")
    out = io.StringIO()
    users_main(["--db", db, "revoke", "ann"], out=out)
    assert "revoked 1 API key(s) of ann" in out.getvalue()
    with pytest.raises(ValueError, match="parley users delete ann --yes"):
        users_main(["--db", db, "delete", "ann"], out=out)  # nothing is deleted without saying so
    with Store(db) as store:
        assert store.get_user_by_name("ann") is not None and store.user_for_key(key) is None
    users_main(["--db", db, "delete", "ann", "--yes"], out=out)
    with Store(db) as store:
        assert store.get_user_by_name("ann") is None
        assert store.db.execute("SELECT count(*) FROM conversations").fetchone()[0] == 0
    with pytest.raises(ValueError, match="no user named 'ann'"):
        users_main(["--db", db, "revoke", "ann"], out=out)
