"""Barge-in: the user speaks over an answer. The turn stops through the engine's one cancellation
path (Request.cancel) within one engine step, the answer so far is saved marked interrupted, and
a "barge-in" is recorded as feedback on it (store migration 10), on SQLite and PostgreSQL."""

import asyncio
import threading
import time

import pytest

import parley.store.store as store_module
from parley.pipeline.assistant import AssistantConfig
from parley.serve.turns import TurnDone, TurnRunner
from parley.store import Store
from parley.store.schema import MIGRATIONS
from parley.store.schema_pg import PG_MIGRATIONS
from pg import pg_server, store_target  # noqa: F401 (fixtures)
from serving import GatedEngine
from test_store import on_postgres


def _until(check, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.01)
    return check()


def test_barge_in_feedback_is_a_kind_and_older_feedback_survives_its_migration(store_target, monkeypatch):
    name = "PG_MIGRATIONS" if on_postgres(store_target) else "MIGRATIONS"
    migrations = PG_MIGRATIONS if on_postgres(store_target) else MIGRATIONS
    monkeypatch.setattr(store_module, name, migrations[:9])  # the version before barge-in feedback
    with Store(store_target) as old:
        ann = old.add_user("ann").id
        conv = old.create_conversation(ann, "c").id
        _, answer = old.add_exchange(ann, conv, "q", "a", {"stages": []})
        old.add_feedback(ann, answer.id, 1, edited_text="better")
        with pytest.raises(Exception):  # version 9 knows no barge-in
            with old._tx() as db:
                db.execute("UPDATE feedback SET kind = 'barge-in'")
    monkeypatch.setattr(store_module, name, migrations)
    with Store(store_target) as store:
        assert store.version == len(MIGRATIONS) == len(PG_MIGRATIONS)
        kept = store.get_feedback(ann, answer.id)
        assert (kept.rating, kept.edited_text, kept.kind) == (1, "better", "rating")
        assert store.add_feedback(ann, answer.id, -1, kind="barge-in").kind == "barge-in"
        with pytest.raises(ValueError, match="kind"):
            store.add_feedback(ann, answer.id, -1, kind="regenerated")  # only `withdraw` writes that
        assert store.delete_conversation(ann, conv)  # the rebuilt table still cascades
        assert store.get_feedback(ann, answer.id) is None


@pytest.fixture
def runner(tiny768_registry, tmp_path):
    model, tokenizer, _ = tiny768_registry.load("tiny768")
    engine = GatedEngine(model, after=3).start()
    db = str(tmp_path / "p.db")
    with Store(db) as store:
        user = store.add_user("ann")
    cfg = AssistantConfig(stages=["respond"], db=db, model="tiny768", max_tokens=200, temperature=0.0)
    local = threading.local()  # one connection per turn thread, as the server keeps them

    def store():
        if not hasattr(local, "store"):
            local.store = Store(db)
        return local.store

    turns = TurnRunner(cfg, store, engine, tokenizer, embed=None, workers=1)
    yield turns, engine, user, db
    engine.gate.set()
    turns.close()
    engine.close()


def _drain(running) -> list:
    async def frames():
        return [item async for item in running.frames()]

    return asyncio.run(frames())


def test_barge_in_cancels_generation_within_one_engine_step(runner):
    turns, engine, user, db = runner
    running = turns.start(user, None, "Tell me a long story about the sea.", overrides={})
    assert _until(lambda: len(engine.requests) == 1 and len(engine.requests[0].tokens) >= 3)
    (request,) = engine.requests  # held at the gate, in the middle of a step
    before = len(request.tokens)
    running.interrupt("barge-in")
    assert request.cancelled  # at once, not at the turn's next frame
    engine.gate.set()
    assert request.wait(timeout=30) == "cancelled"
    assert len(request.tokens) <= before + 1  # only the step that was under way finished
    done = _drain(running)[-1]
    assert isinstance(done, TurnDone) and done.message_id is not None
    with Store(db) as store:
        (asked, answer) = store.messages(user.id, done.conversation_id)
        assert asked.content == "Tell me a long story about the sea."
        assert answer.content.endswith("[interrupted]")
        feedback = store.get_feedback(user.id, done.message_id)
        assert (feedback.kind, feedback.rating) == ("barge-in", -1)


def test_a_plain_stop_saves_no_barge_in(runner):
    """The page's Stop (or a client gone) is not a barge-in: no feedback is recorded."""
    turns, engine, user, db = runner
    running = turns.start(user, None, "Tell me a long story about the sea.", overrides={})
    assert _until(lambda: len(engine.requests) == 1 and len(engine.requests[0].tokens) >= 3)
    running.stop()
    engine.gate.set()
    assert engine.requests[0].wait(timeout=30) == "cancelled"
    done = _drain(running)[-1]
    with Store(db) as store:
        conversations = store.list_conversations(user.id)
        if done.message_id is not None:
            assert store.get_feedback(user.id, done.message_id) is None
        assert all(store.get_feedback(user.id, m.id) is None
                   for c in conversations for m in store.messages(user.id, c.id))
