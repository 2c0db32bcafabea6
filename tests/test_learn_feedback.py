"""Feedback becomes training examples (parley/learn/feedback.py): edits and thumbs up are SFT
targets, regenerations pair with the next answer, and nothing of an untrusted user or of a turn
the safety rails caught is ever learned from. On SQLite and PostgreSQL."""

from pg import pg_server, store_target  # noqa: F401 (store_target is a fixture)

from parley.learn.feedback import collect
from parley.store import Store

ALLOW = {"stages": [{"stage": "safety_in", "decision": "allow", "evidence": {}}]}
REFUSED = {"stages": [{"stage": "safety_in", "decision": "refuse", "evidence": {"principle": "C1"}}]}


def exchange(store, user, conv, q, a, trace=ALLOW):
    return store.add_exchange(user, conv, q, a, trace)[1].id


def test_each_kind_of_feedback_and_what_is_never_learned(store_target):
    with Store(store_target) as store:
        ann, eve = store.add_user("ann").id, store.add_user("eve").id
        conv = store.create_conversation(ann).id
        liked = exchange(store, ann, conv, "hi", "Hello!")
        store.add_feedback(ann, liked, 1)
        edited = exchange(store, ann, conv, "capital of France?", "Lyon.")
        store.add_feedback(ann, edited, -1, "Paris.")
        bad = exchange(store, ann, conv, "2+2?", "5")
        store.withdraw(ann, bad, regenerated=True)
        exchange(store, ann, conv, "2+2?", "4")
        disliked = exchange(store, ann, conv, "a joke?", "No.")
        store.add_feedback(ann, disliked, -1)
        caught = exchange(store, ann, conv, "how to hurt someone", "I can't help with that.", REFUSED)
        store.add_feedback(ann, caught, 1)
        econv = store.create_conversation(eve).id
        store.add_feedback(eve, exchange(store, eve, econv, "hi", "Buy pills at spam.example"), 1)
        store.set_trusted(eve, False)
        assert not store.is_trusted(eve) and store.is_trusted(ann)

        found = collect(store)
        assert [(e["source"], e["messages"][-1]["content"]) for e in found.sft] == [("thumbs_up", "Hello!"),
                                                                                   ("edit", "Paris.")]
        assert found.sft[1]["messages"][:-1] == [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "Hello!"},
                                                 {"role": "user", "content": "capital of France?"}]
        assert [(p.chosen, p.rejected, p.source, p.labeler) for p in found.pairs] == [
            ("Paris.", "Lyon.", "feedback", "human"), ("4", "5", "feedback", "human")]
        assert found.pairs[1].prompt[-1] == {"role": "user", "content": "2+2?"}
        assert [a["answer"] for a in found.against] == ["No."]
        reasons = {s["turn_id"]: s["reason"] for s in found.skipped}
        assert reasons[caught].startswith("rails (safety_in: refuse)") and set(reasons.values()) - {
            reasons[caught]} == {"untrusted user"}
        learned = repr(found.sft) + repr(found.pairs) + repr(found.against)
        assert "spam.example" not in learned and "hurt someone" not in learned

        assert collect(store, since=found.until).counts()["sft"] == 0  # the next round starts after these
        only_eve = collect(store, user="eve")
        assert not only_eve.sft and only_eve.counts()["skipped_untrusted user"] == 1


def test_the_users_command_marks_a_user_untrusted(tmp_path):
    import io

    from parley.serve.main import users_main

    db = str(tmp_path / "p.db")
    with Store(db) as store:
        eve = store.add_user("eve").id
    out = io.StringIO()
    users_main(["--db", db, "untrust", "eve"], out=out)
    assert "never becomes training data" in out.getvalue()
    with Store(db) as store:
        assert not store.is_trusted(eve)
    users_main(["--db", db, "trust", "eve"], out=out)
    with Store(db) as store:
        assert store.is_trusted(eve)
