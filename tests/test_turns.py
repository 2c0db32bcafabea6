"""Turns of many users at once through the HTTP API share one assistant and nothing else: a real
server (uvicorn on a local port, the engine over the tiny model, the real
MiniLM embedder and intent classifier, a SQLite file), 16 concurrent turns from 4 users whose
messages each carry their own e-mail address and date, so any slot, trace or answer that
reached the wrong user or conversation would show."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from parley.engine.config import EngineConfig
from parley.serve.app import create_app
from parley.serve.settings import Settings
from parley.store import Store
from serving import serving
from test_serve import make_users

USERS = ["ann", "bob", "cy", "dee"]
LEAK = re.compile(r"[\w.]+@example\.org|2027-\d\d-\d\d")  # every e-mail and date the users sent


@pytest.fixture(scope="module")
def site(tiny768_registry, embedder, tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # the intent head is trained here on first use, not in ~/.parley
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PARLEY_HOME", str(home))
        db = str(tmp_path_factory.mktemp("db") / "parley.db")
        keys = make_users(db, **{name: "user" for name in USERS})
        settings = Settings(db=db, home=tiny768_registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                            stages=["nlu", "state", "respond"], max_tokens=8, pipeline_workers=4)
        with serving(create_app(settings, embedder=embedder)) as url:
            yield url, keys, db


def ask(site, user: str, text: str, conversation: int | None = None) -> dict:
    """One turn of model "parley": what the user is told, and where it was saved."""
    url, keys, _ = site
    headers = {"Authorization": f"Bearer {keys[user]}"}
    if conversation is not None:
        headers["X-Parley-Conversation"] = str(conversation)
    reply = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=120, json={
        "model": "parley", "messages": [{"role": "user", "content": text}], "temperature": 0.7, "seed": 1})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return {"user": user, "text": text, "answer": body["choices"][0]["message"]["content"],
            "conversation": int(reply.headers["x-parley-conversation"]), **body["parley"]}


def get(site, user: str, path: str) -> httpx.Response:
    url, keys, _ = site
    return httpx.get(url + path, headers={"Authorization": f"Bearer {keys[user]}"}, timeout=60)


def at_once(calls) -> list:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def slots_in(trace: dict) -> dict:
    (state,) = [s for s in trace["stages"] if s["stage"] == "state"]
    return state["evidence"]["slots"]


def contact(slots: dict) -> dict:
    """The e-mail and date slots (NLU may add others, such as the fact of a "remember" intent)."""
    return {k: v for k, v in slots.items() if k in ("email", "date")}


def test_concurrent_users_see_only_their_own_turns_slots_and_traces(site):
    _, _, db = site
    sent = {(user, j): (f"{user}.{j}@example.org", f"2027-{i + 1:02d}-{j + 10}")
            for i, user in enumerate(USERS) for j in range(4)}
    own = {user: {v for (u, _), pair in sent.items() if u == user for v in pair} for user in USERS}
    first = at_once([lambda u=u, j=j, e=e, d=d: {**ask(site, u, f"My email is {e} and I fly on {d}"), "j": j}
                     for (u, j), (e, d) in sent.items()])
    assert len({t["conversation"] for t in first}) == 16 and len({t["turn_id"] for t in first}) == 16
    with Store(db) as store:
        for t in first:
            email, date = sent[t["user"], t["j"]]
            uid = store.get_user_by_name(t["user"]).id
            assert contact(store.get_slots(uid, t["conversation"])) == {"email": email, "date": date}
            others = [store.get_user_by_name(u).id for u in USERS if u != t["user"]]
            assert all(store.get_conversation(o, t["conversation"]) is None for o in others)
    for t in first:
        email, date = sent[t["user"], t["j"]]
        trace = get(site, t["user"], f"/api/turns/{t['turn_id']}/trace").json()
        assert contact(slots_in(trace)) == {"email": email, "date": date}
        # this conversation's, and at most the user's own memory of other conversations: no one else's
        assert {email, date} <= set(LEAK.findall(json.dumps(trace))) <= own[t["user"]]
        messages = get(site, t["user"], f"/api/conversations/{t['conversation']}").json()["turns"]
        assert [m["content"] for m in messages] == [t["text"], t["answer"].strip()]
        for other in USERS:
            if other != t["user"]:
                assert get(site, other, f"/api/turns/{t['turn_id']}/trace").status_code == 404
    for user in USERS:
        mine = {c["id"] for c in get(site, user, "/api/conversations").json()["data"]}
        assert mine == {t["conversation"] for t in first if t["user"] == user}

    # a second turn in each conversation, all at once: each carries its own conversation's slots
    again = at_once([lambda t=t: {**ask(site, t["user"], "thanks a lot", t["conversation"]), "j": t["j"]}
                     for t in first])
    for t in again:
        email, date = sent[t["user"], t["j"]]
        trace = get(site, t["user"], f"/api/turns/{t['turn_id']}/trace").json()
        assert contact(slots_in(trace)) == {"email": email, "date": date}
        assert {email, date} <= set(LEAK.findall(json.dumps(trace))) <= own[t["user"]]

    # deleted: every conversation of every user; then others start new ones at once
    for t in first:
        url, keys, _ = site
        gone = httpx.delete(f"{url}/api/conversations/{t['conversation']}",
                            headers={"Authorization": f"Bearer {keys[t['user']]}"})
        assert gone.status_code == 200
    old = {t["conversation"] for t in first}
    fresh = at_once([lambda u=u: ask(site, u, "hello there") for u in USERS for _ in range(2)])
    assert all(t["conversation"] > max(old) for t in fresh)  # never a deleted conversation's id
    with Store(db) as store:
        assert store.db.execute("SELECT count(*) FROM dialogue_state WHERE conversation_id IN "
                                f"({', '.join('?' * len(old))})", tuple(old)).fetchone()[0] == 0
        for t in fresh:
            assert store.get_slots(store.get_user_by_name(t["user"]).id, t["conversation"]) == {}
    for t in fresh:
        trace = get(site, t["user"], f"/api/turns/{t['turn_id']}/trace").json()
        assert slots_in(trace) == {} and set(LEAK.findall(json.dumps(trace))) <= own[t["user"]]
        assert set(LEAK.findall(t["answer"])) <= own[t["user"]]
    for user in USERS:  # a deleted conversation is no one's: not its owner's, not anyone else's
        for conv in old:
            assert get(site, user, f"/api/conversations/{conv}").status_code == 404


def test_each_saved_answer_names_the_model_that_wrote_it(site):
    turn = ask(site, "ann", "Hello there")
    conv = get(site, "ann", f"/api/conversations/{turn['conversation']}").json()
    models = [(t["role"], t["model"]) for t in conv["turns"]]
    assert models[0] == ("user", None)
    assert models[1][0] == "assistant" and models[1][1].split(",")[0] == "tiny768", models
