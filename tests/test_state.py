"""Dialogue state: memory facts in a real SQLite store with real embeddings, slots carried
across turns, memory commands answered by the stage, and the history token budget."""

import pytest

from parley.pipeline.frames import Intent, MemoryRecall, MemoryUpdate, Notice, Slots, UserText
from parley.pipeline.runner import Pipeline, Stage, Turn
from parley.pipeline.state import (Memory, MemoryInputError, StateStage, fact_to_forget, fact_to_remember,
                                   fit_history, second_person)
from parley.store import Store


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "parley.db") as s:
        yield s


def test_memory_recall_is_by_meaning_and_per_user(store, embedder, tmp_path):
    alice, bob = store.add_user("alice").id, store.add_user("bob").id
    memory = Memory(store, embedder)
    memory.remember(alice, "my sister is called Ana")
    memory.remember(alice, "I am allergic to peanuts")
    memory.remember(alice, "my sister is called Ana")  # a repeat is not stored twice
    assert [f.text for f in memory.all(alice)] == ["my sister is called Ana", "I am allergic to peanuts"]
    best = memory.recall(alice, "what is my sister's name?")
    assert best[0].text == "my sister is called Ana" and best[0].similarity > 0.5
    assert [f.text for f in memory.recall(alice, "can I eat a snickers bar with nuts?")][:1] == ["I am allergic to peanuts"]
    assert memory.recall(alice, "what's the weather on Jupiter") == []  # nothing relevant, nothing recalled
    assert memory.recall(bob, "what is my sister's name?") == []
    # persists: a new connection to the same file sees the facts
    with Store(tmp_path / "parley.db") as again:
        assert Memory(again, embedder).recall(alice, "sister's name")[0].text == "my sister is called Ana"


def test_forget_by_words_meaning_or_everything(store, embedder):
    uid = store.add_user("u").id
    memory = Memory(store, embedder)
    for fact in ["my sister is called Ana", "I live in Lisbon", "my favourite colour is green"]:
        memory.remember(uid, fact)
    assert [f.text for f in memory.forget(uid, "Lisbon")] == ["I live in Lisbon"]
    assert [f.text for f in memory.forget(uid, "the name of my sibling")] == ["my sister is called Ana"]
    assert [f.text for f in memory.forget(uid, "everything")] == ["my favourite colour is green"]
    assert memory.all(uid) == []
    with pytest.raises(MemoryInputError, match="nothing to remember"):
        memory.remember(uid, "   ")
    with pytest.raises(MemoryInputError, match="at most 500"):
        memory.remember(uid, "x" * 501)
    with pytest.raises(MemoryInputError, match="say what to forget"):
        memory.forget(uid, "")


def test_phrase_helpers():
    assert fact_to_remember("Please remember that my sister is called Ana") == "my sister is called Ana"
    assert fact_to_remember("remember: I'm vegetarian") == "I'm vegetarian"
    assert fact_to_forget("forget that my sister is called Ana") == "my sister is called Ana"
    assert fact_to_forget("Please forget about my address") == "my address"
    assert second_person("I am allergic to my cat, and I'm sad") == "you are allergic to your cat, and you're sad"


class FixedIntent(Stage):
    """Stands in for NLU so these tests pin the intent (NLU has its own tests)."""

    name = "nlu"

    def __init__(self, intent, slots=None):
        self.intent, self.slots = intent, slots or {}

    def process(self, frame, turn):
        if isinstance(frame, UserText):  # what a stage learns about a frame goes before it
            yield Intent(self.intent, 1.0)
            yield Slots(self.slots)
        yield frame


def test_stage_answers_memory_commands_and_recalls_facts(store, embedder):
    uid = store.add_user("u").id
    state = StateStage(embedder)
    out = Pipeline([FixedIntent("remember"), state])(Turn(uid, store=store), "remember that my sister is called Ana")
    assert not any(isinstance(f, UserText) for f in out)  # answered by the stage, nothing generated
    assert MemoryUpdate("remembered", ("my sister is called Ana",)) in out
    assert Notice("I'll remember that your sister is called Ana.") in out

    turn = Turn(uid, store=store)
    out = Pipeline([FixedIntent("knowledge_question"), state])(turn, "Who is my sister?")
    assert out[-1] == UserText("Who is my sister?")  # passed on to respond, with the fact beside it
    assert turn.get(MemoryRecall).facts == ("my sister is called Ana",)
    assert turn.trace["state"].decision == "recalled 1"

    out = Pipeline([FixedIntent("recall_memory"), state])(Turn(uid, store=store), "what do you remember about me?")
    assert "your sister is called Ana" in out[-1].text

    out = Pipeline([FixedIntent("forget_memory"), state])(Turn(uid, store=store), "forget that my sister is called Ana")
    assert out[-1] == Notice("Forgotten: your sister is called Ana.")
    out = Pipeline([FixedIntent("forget_memory"), state])(Turn(uid, store=store), "forget my car")
    assert out[-1] == Notice("I had nothing like that in memory.")


def test_slots_carry_across_turns_of_one_conversation_in_the_store(store, embedder, tmp_path):
    uid = store.add_user("u").id
    oslo, other = store.create_conversation(uid, "trip"), store.create_conversation(uid, "other")
    state = StateStage(embedder)
    first = Turn(uid, oslo.id, store=store)
    Pipeline([FixedIntent("chitchat", {"city": "Oslo"}), state])(first, "I'm going to Oslo")
    assert first.slots == {"city": "Oslo"} and store.get_slots(uid, oslo.id) == {}  # saved with the answer
    store.add_exchange(uid, oslo.id, "I'm going to Oslo", "Nice!", slots=first.slots)
    with Store(tmp_path / "parley.db") as reopened:  # the state is in the store, not in the stage
        turn = Turn(uid, oslo.id, store=reopened)
        Pipeline([FixedIntent("chitchat", {"date": "tomorrow"}), StateStage(embedder)])(turn, "leaving tomorrow")
    assert turn.get(Slots).values == {"city": "Oslo", "date": "tomorrow"}
    assert turn.trace["state"].evidence["slots"] == {"city": "Oslo", "date": "tomorrow"}
    elsewhere = Turn(uid, other.id, store=store)
    Pipeline([FixedIntent("chitchat", {}), state])(elsewhere, "hi")
    assert elsewhere.slots == {} and elsewhere.trace["state"].evidence["slots"] == {}
    with pytest.raises(ValueError, match="give the Turn a store"):
        Pipeline([state])(Turn(uid), "hi")


def test_fit_history_drops_oldest_exchanges_and_summarises_them():
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question number {i} about topic {i}"},
                    {"role": "assistant", "content": f"answer {i}"}]
    count = lambda msgs: sum(len(m["content"].split()) for m in msgs)  # noqa: E731 - one word, one token
    kept, summary = fit_history(history, count, budget=20)
    assert count(kept) <= 20 and kept[0]["role"] == "user" and kept[-1] == history[-1]
    dropped = (len(history) - len(kept)) // 2
    assert summary.startswith("Earlier in this conversation the user said:")
    assert all(f"question number {i}" in summary for i in range(dropped))
    assert fit_history(history, count, budget=1000) == (history, None)


def test_explicit_memory_commands_override_the_classifier(store, embedder):
    from parley.pipeline.state import explicit_command

    assert explicit_command("Please forget that my sister is called Ana") == "forget_memory"
    assert explicit_command("note that the meeting is at 5") == "remember"
    for not_a_command in ("forget it", "I forget things often", "do you remember my sister?", "remember me?"):
        assert explicit_command(not_a_command) is None, not_a_command
    uid = store.add_user("u").id
    memory = Memory(store, embedder)
    memory.remember(uid, "my sister is called Ana")
    # the classifier says "remember" (it does confuse the two); the words say forget
    turn = Turn(uid, store=store)
    out = Pipeline([FixedIntent("remember"), StateStage(embedder)])(turn, "Please forget that my sister is called Ana")
    assert out[-1] == Notice("Forgotten: your sister is called Ana.")
    assert turn.trace["state"].evidence["classifier"] == "remember"
    assert memory.forget(uid, "it") == []  # a word inside other words ("with", "visit") matches nothing
