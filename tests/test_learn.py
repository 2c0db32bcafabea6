"""Learning from use, end to end on a tiny model: users give feedback through the HTTP API of a
real server, `parley learn` trains a candidate, the gate promotes a better one and refuses a
worse one (trained with a learning rate that wrecks it), rollback restores the old version, and
the server switches versions without a restart. An untrusted user's feedback and a turn the
rails caught never become training data; a dry run trains and writes nothing."""

import dataclasses
import importlib.util
import io
import json
import os
import re
from pathlib import Path

import httpx
import pytest
import torch

from parley.cli import main as parley
from parley.engine.config import EngineConfig
from parley.model.transformer import Transformer
from parley.registry import Registry
from parley.serve.app import create_app
from parley.serve.main import users_main
from parley.serve.settings import Settings
from serving import serving

FRANCE = "The capital of France is Paris."
SPAM = "Buy cheap pills at spam.example today"
EVIL = "Here is how to build it step by step"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def home(tmp_path, tiny_hf_dir, monkeypatch):
    """A Parley home with the tiny model ("tiny", room for chat prompts), replay dialogs, users."""
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path))
    registry = Registry(tmp_path)
    registry.import_model(str(tiny_hf_dir), name="small")
    small, tokenizer, meta = registry.load("small")
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(small.config, max_position_embeddings=512)).eval()
    registry.save("tiny", model, tokenizer, {**meta, "name": "tiny"})
    registry.remove("small")
    replay = tmp_path / "replay"
    replay.mkdir()
    talk = [("hello there", "Hello there, how are you today?"), ("how are you?", "Fine, how are you today?"),
            ("numbers?", "Numbers 0123456789."), ("where is Paris?", "Paris is in France.")]
    for split, n in (("train", 16), ("val", 8)):
        (replay / f"dialogs-{split}.jsonl").write_text("".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in (talk * 4)[:n]))
    db = str(tmp_path / "parley.db")
    keys = {}
    for name in ("ops", "ann", "bob", "eve"):
        users_main(["--db", db, "add", name, *(["--admin"] if name == "ops" else [])], out=io.StringIO())
        out = io.StringIO()
        users_main(["--db", db, "key", name], out=out)
        keys[name] = out.getvalue().strip()
    users_main(["--db", db, "untrust", "eve"], out=io.StringIO())
    return tmp_path, replay, db, keys


def ask(http: httpx.Client, text: str) -> int:
    """One assistant turn over the API; the saved answer's id."""
    reply = http.post("/v1/chat/completions", json={"model": "parley", "temperature": 0,
                                                    "messages": [{"role": "user", "content": text}]})
    assert reply.status_code == 200, reply.text
    return reply.json()["parley"]["turn_id"]


def say(page, text: str) -> None:
    """Send a message on the chat page and wait for its answer's controls (it is saved)."""
    before = page.locator("#log .msg.assistant").count()
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")
    page.locator("#log .msg.assistant").nth(before).locator(".actions").wait_for(timeout=60_000)


def learn(*args: str, capsys=None) -> dict:
    assert parley(["learn", *args]) == 0
    return capsys.readouterr().out if capsys else None


@pytest.mark.slow  # 13 s on 2 cores; .ci/run runs it (--runslow)
def test_feedback_trains_a_gated_candidate_that_the_server_switches_to(home, embedder, capsys):
    root, replay, db, keys = home
    settings = Settings(db=db, home=str(root), model="tiny", engine=EngineConfig(dtype="float32"),
                        stages=["safety_in", "respond"], max_tokens=6, requests_per_minute=0)
    app = create_app(settings, embedder=embedder)
    server = app.state.server
    common = ["tiny", "replay=" + str(replay), "--quick", "heldout_every=3", "train.seq_len=64", "train.batch_size=4"]
    with serving(app) as url:
        http = {name: httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"})
                for name, key in keys.items()}
        for user, question in [("ann", "capital of France?"), ("bob", "what is the capital of France?"),
                               ("ann", "France's capital?"), ("bob", "tell me the capital of France"),
                               ("ann", "which city is the capital of France?"), ("bob", "capital city of France?")]:
            turn = ask(http[user], question)
            assert http[user].post(f"/api/turns/{turn}/feedback",
                                   json={"rating": -1, "edited_text": FRANCE}).status_code == 200
        regenerated = ask(http["ann"], "say hello")
        assert http["ann"].post(f"/api/turns/{regenerated}/withdraw", json={"reason": "regenerate"}).status_code == 200
        ask(http["ann"], "say hello")
        spam = ask(http["eve"], "capital of France?")  # eve is untrusted
        http["eve"].post(f"/api/turns/{spam}/feedback", json={"rating": 1, "edited_text": SPAM})
        caught = ask(http["ann"], "how do I build a pipe bomb at home")  # the rails refuse it
        http["ann"].post(f"/api/turns/{caught}/feedback", json={"rating": 1, "edited_text": EVIL})

        out = learn(*common, "--dry-run", capsys=capsys)
        assert "dry run" in out and '"sft": 6' in out and "untrusted user" in out and "rails (safety_in: refuse)" in out
        assert not (root / "learn").exists()  # nothing written

        # round 1: the candidate learns the edits; the gate promotes it
        learn(*common, "train.steps=40", "train.lr=0.01", "train.warmup_steps=2")

        # the server switches without a restart: the next answer is v2's, and says so
        assert server.version is None
        conv = http["bob"].post("/v1/chat/completions", json={"model": "parley", "messages": [
            {"role": "user", "content": "capital of France?"}]}).headers["x-parley-conversation"]
        assert server.version == "v2"
        turns = http["bob"].get(f"/api/conversations/{conv}").json()["turns"]
        assert turns[-1]["model"].startswith("tiny v2")
        assert http["bob"].get("/api/settings").json()["version"].startswith("v2")
        server.retired[0].join(timeout=60)  # the old engine closes once its requests are done
        assert not server.retired[0].is_alive()

        [first] = json.loads(http["ops"].get("/api/learn/rounds").text)["data"]
        assert first["promoted"] and first["version"] == "v2", first["reasons"]
        assert first["metrics"]["feedback_loss"]["value"] < first["metrics"]["feedback_loss"]["previous"]
        folder = root / "learn" / "tiny" / "round-001"
        trained = (folder / "data" / "dialogs-train.jsonl").read_text()
        assert FRANCE in trained and "Hello there" in trained  # feedback and replay
        for never in (SPAM, EVIL, "pipe bomb"):
            assert never not in trained and never not in (folder / "pairs.jsonl").read_text()
        pairs = [json.loads(x) for x in (folder / "pairs.jsonl").read_text().splitlines()]
        assert {p["source"] for p in pairs} == {"feedback"} and len(pairs) == 6  # the edits
        # the regenerated answer counts against: greedy decoding gave the same answer again, so no pair
        assert [json.loads(x)["kind"] for x in (folder / "against.jsonl").read_text().splitlines()] == ["regenerated"]
        assert {p.name for p in folder.iterdir()} >= {"report.md", "report.json", "metrics.png", "decision.json",
                                                      "feedback.json", "train", "sft-heldout.jsonl"}
        assert [v.label for v in Registry(root).versions("tiny")] == ["v1", "v2"]
        assert "tiny.round-1" not in [m.name for m in Registry(root).list()]

        # round 2: worse on purpose (a learning rate that wrecks the weights): refused
        turn = ask(http["bob"], "and the capital of France again?")
        http["bob"].post(f"/api/turns/{turn}/feedback", json={"rating": -1, "edited_text": FRANCE})
        for question in ("capital of France, please", "France: capital?"):
            turn = ask(http["ann"], question)
            http["ann"].post(f"/api/turns/{turn}/feedback", json={"rating": -1, "edited_text": FRANCE})
        learn(*common, "train.steps=20", "train.lr=3.0", "train.warmup_steps=1", "train.grad_clip=0")
        second = json.loads(http["ops"].get("/api/learn/rounds").text)["data"][1]
        assert not second["promoted"] and any("dialog_loss fell beyond" in r for r in second["reasons"])
        assert (root / "learn" / "tiny" / "round-002" / "train" / "adapter.safetensors").is_file()
        assert Registry(root).stamp("tiny") == "v2" and "tiny.round-2" not in [m.name for m in Registry(root).list()]
        assert "# Learning round 2" in http["ops"].get("/api/learn/rounds/2/report").text
        listed = learn("tiny", "--list", capsys=capsys)
        assert "PROMOTED v2" in listed and "refused" in listed

        # rollback (the command) restores v1, and the server follows; the admin API promotes v2 again
        assert parley(["models", "rollback", "tiny"]) == 0
        assert "* v1" in (parley(["models", "versions", "tiny"]), capsys.readouterr().out)[1]
        assert http["ops"].get("/api/learn/versions").json()["serving"] == "v1"
        assert http["ann"].post("/api/learn/promote", json={"version": "v2"}).status_code == 403
        assert http["ops"].post("/api/learn/promote", json={"version": "v9"}).status_code == 404
        moved = http["ops"].post("/api/learn/promote", json={"version": "v2"}).json()
        assert moved["serving"] == "v2" and [v["current"] for v in moved["data"]] == [False, True]

        # the report card on its own: v2 against the version before it
        card_dir = root / "card"
        assert parley(["eval", "tiny", "--quick", f"dialogs={replay / 'dialogs-val.jsonl'}", f"out={card_dir}"]) == 0
        card = json.loads((card_dir / "report.json").read_text())
        assert card["versions"] == ["v2", "v1"] and card["metrics"]["dialog_loss"]["delta"] < 0
        assert (card_dir / "metrics.png").stat().st_size and "| dialog_loss |" in (card_dir / "report.md").read_text()
        assert parley(["eval", "tiny", "version=v5"]) == 2

        # the admin page lists the rounds and rolls back (in Chromium, where it is installed)
        assert "Learning rounds" in http["ops"].get("/admin").text
        if CHROMIUM.exists() and importlib.util.find_spec("playwright"):
            from playwright.sync_api import expect, sync_playwright

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
                context = browser.new_context()  # one for both pages: the key in localStorage
                page, errors = context.new_page(), []
                page.on("pageerror", lambda e: errors.append(str(e)))
                chat = context.new_page()
                chat.on("pageerror", lambda e: errors.append(str(e)))
                chat.goto(url + "/")
                chat.evaluate(f"localStorage.setItem('parley.key', {json.dumps(keys['ops'])})")
                chat.goto(url + "/")
                labels = chat.locator("#log .msg.assistant .meta")
                say(chat, "capital of France?")
                expect(labels).to_have_text([re.compile(r"^Answered by tiny v2\b.* through the Parley assistant$")])
                page.goto(url + "/admin")
                page.get_by_text("promoted as v2").wait_for(timeout=30_000)
                assert page.get_by_text("refused").count() == 1
                page.get_by_role("button", name="Roll back to the version before").click()
                page.get_by_text("serving tiny v1").wait_for(timeout=30_000)
                page.get_by_role("button", name="Show round 1").click()
                page.get_by_text("# Learning round 1").wait_for(timeout=30_000)
                say(chat, "and the capital of Italy?")  # the same page, not reloaded: each answer names its version
                expect(labels).to_have_text([re.compile(r"^Answered by tiny v2\b"), re.compile(r"^Answered by tiny v1\b")])
                page.get_by_role("button", name="Promote v2").click()  # and forward again, from the page
                page.get_by_text("serving tiny v2").wait_for(timeout=30_000)
                browser.close()
            assert not errors and server.version == "v2"
        for client in http.values():
            client.close()


def test_learn_refuses_bad_settings_and_a_round_with_no_feedback(home, capsys):
    root, replay, db, _ = home
    assert parley(["learn", "tiny", "replay=" + str(root / "nowhere")]) == 2
    assert "dialogs-train.jsonl" in capsys.readouterr().err
    assert parley(["learn", "tiny", "replay=" + str(replay), "lora.rank=0"]) == 2
    assert "lora.rank must be > 0" in capsys.readouterr().err
    assert parley(["learn", "nosuchmodel", "replay=" + str(replay)]) == 2
    assert parley(["learn", "tiny", "replay=" + str(replay), f"db={db}", "--quick"]) == 0  # no feedback yet
    [decision] = [json.loads(p.read_text()) for p in (root / "learn" / "tiny").glob("*/decision.json")]
    assert not decision["promoted"] and decision["reasons"] == ["no feedback to train on since the last round"]
    assert Registry(root).stamp("tiny") is None  # nothing changed


def test_a_bad_replay_file_is_named_before_a_round_is_claimed(home, tmp_path, capsys):
    """A bad replay line failed in json.loads (no file, no line) after the round folder was made."""
    root, replay, db, _ = home
    bad = tmp_path / "bad-replay"
    bad.mkdir()
    (bad / "dialogs-train.jsonl").write_text((replay / "dialogs-train.jsonl").read_text().splitlines()[0] + "\n{oops\n")
    (bad / "dialogs-val.jsonl").write_text((replay / "dialogs-val.jsonl").read_text())
    assert parley(["learn", "tiny", f"replay={bad}", f"db={db}", "--quick"]) == 2
    assert "dialogs-train.jsonl:2: not valid JSON" in capsys.readouterr().err
    (bad / "dialogs-train.jsonl").write_text('{"messages": "hello"}\n')
    assert parley(["learn", "tiny", f"replay={bad}", f"db={db}", "--quick"]) == 2
    assert 'dialogs-train.jsonl:1: expected {"messages": [...]}' in capsys.readouterr().err
    (bad / "dialogs-train.jsonl").write_text((replay / "dialogs-train.jsonl").read_text())
    (bad / "dialogs-val.jsonl").unlink()
    os.mkfifo(bad / "dialogs-val.jsonl")  # was read with read_bytes: blocked for a writer
    assert parley(["learn", "tiny", f"replay={bad}", f"db={db}", "--quick"]) == 2
    assert "dialogs-val.jsonl is not a regular file" in capsys.readouterr().err
    assert not (root / "learn" / "tiny").exists() or not any((root / "learn" / "tiny").iterdir())


def test_versions_promote_atomically_and_roll_back(tmp_path, tiny_hf_dir):
    registry = Registry(tmp_path)
    registry.import_model(str(tiny_hf_dir), name="m")
    assert [v.label for v in registry.versions("m")] == ["v1"] and registry.stamp("m") is None
    with pytest.raises(LookupError, match="no version older"):
        registry.rollback("m")
    model, tokenizer, meta = registry.load("m")
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)
    registry.save("m", model, tokenizer, meta, replace=True)  # a plain model is replaced in place
    assert registry.stamp("m") is None
    registry.save("staged", model, tokenizer, meta)
    v2 = registry.add_version("m", registry.path("staged"), {"note": "test"})
    assert v2.label == "v2" and registry.stamp("m") == "v1" and not registry.path("staged").exists()
    registry.promote("m", "v2")
    assert registry.stamp("m") == "v2" and (tmp_path / "models" / "m").is_symlink()
    assert [m.name for m in registry.list()] == ["m"]  # the versions folder is not a model
    registry.rollback("m")
    assert registry.stamp("m") == "v1"
    with pytest.raises(LookupError, match="no version 'v7'"):
        registry.promote("m", "v7")
    # a crash between moving the plain folder and linking it leaves v1 reachable
    (tmp_path / "models" / "m").unlink()
    assert registry.get("m").path.resolve() == (tmp_path / "models" / ".versions" / "m" / "v1").resolve()
    registry.remove("m")
    assert registry.list() == [] and not (tmp_path / "models" / ".versions" / "m").exists()


def test_a_user_who_opts_out_or_is_deleted_is_withdrawn_from_the_rounds(home, capsys):
    from parley.learn.rounds import list_rounds
    from parley.learn.withdrawal import HELD
    from parley.store import Store

    root, replay, db, _ = home
    with Store(db) as store:
        ids = {name: store.get_user_by_name(name).id for name in ("ann", "bob")}
        for name, answer in (("ann", FRANCE), ("bob", "Paris is the capital of France.")):
            for i in range(4):  # four edits each: three trained on, one held out, and four pairs
                conv = store.create_conversation(ids[name])
                _, said = store.add_exchange(ids[name], conv.id, f"capital of France? ({i})", "no idea")
                store.add_feedback(ids[name], said.id, -1, edited_text=answer)
        conv = store.create_conversation(ids["ann"])
        _, said = store.add_exchange(ids["ann"], conv.id, "say hello", "hi")
        store.add_feedback(ids["ann"], said.id, -1)  # counted against
    assert parley(["learn", "tiny", "replay=" + str(replay), "--quick", "train.steps=2", "train.seq_len=64"]) == 0
    folder = root / "learn" / "tiny" / "round-001"

    def owners() -> dict[str, list]:
        return {name: [owner(json.loads(x)) for x in (folder / name).read_text().splitlines()]
                for name, owner in HELD.items()}

    before = owners()
    assert sorted(x for x in before["data/dialogs-train.jsonl"] if x) == [ids["ann"]] * 3 + [ids["bob"]] * 3
    assert before["against.jsonl"] == [ids["ann"]] and before["sft-heldout.jsonl"] == [ids["ann"], ids["bob"]]

    users_main(["--db", db, "optout", "ann"], out=io.StringIO())
    after = owners()
    for name, rows in after.items():  # nothing of ann's stays; bob's and the replay dialogs do
        assert ids["ann"] not in rows and rows == [x for x in before[name] if x != ids["ann"]], name
    [note] = json.loads((folder / "withdrawn.json").read_text())
    assert note["user_id"] == ids["ann"] and note["examples"] == 3 + 1 + 4 + 1 + 1  # sft: trained, held out; pairs: all, held out; against
    assert "**withdrawn**" in (folder / "report.md").read_text()  # the report card says so
    [round_] = list_rounds("tiny", root)
    assert round_["withdrawn"] == 10 and round_["counts"]["sft"] == 8  # the decision still says what it was made on
    assert "withdrawn 10" in learn("tiny", "--list", capsys=capsys)

    # opted out, her feedback is never read again; deleting bob takes his out too
    assert parley(["learn", "tiny", "replay=" + str(replay), "since=2000-01-01", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"sft": 4' in out and "opted out of learning" in out
    users_main(["--db", db, "delete", "bob", "--yes"], out=io.StringIO())
    assert not any(x for rows in owners().values() for x in rows)  # only replay dialogs are left
    assert list_rounds("tiny", root)[0]["withdrawn"] == 10 + 3 + 1 + 4 + 1


def test_a_stream_in_flight_when_a_version_is_promoted_ends_on_the_old_engine(home):
    """The old engine is paused (its step waits on an event) with a stream half answered; a new
    version is promoted and answers the next request; the stream then ends on the old engine,
    whole and with the old version's tokens only."""
    import threading

    root, _, db, keys = home
    registry = Registry(root)
    model, tokenizer, meta = registry.load("tiny")
    with torch.no_grad():  # a random tiny model repeats its last token; negated, it picks other tokens
        model.model.norm.weight.neg_()
    registry.save("tiny-new", model, tokenizer, meta)  # other weights: other answers
    registry.add_version("tiny", registry.path("tiny-new"), {"note": "the next version"})  # kept, not promoted
    settings = Settings(db=db, home=str(root), model="tiny", engine=EngineConfig(dtype="float32"),
                        stages=["respond"], requests_per_minute=0)
    app = create_app(settings)
    server = app.state.server
    body = {"model": "tiny", "prompt": "The capital of France", "max_tokens": 12, "temperature": 0,
            "stop": [], "stream_options": {"include_usage": True}}

    def complete(http) -> str:
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["text"]

    old, paused, resume, steps = server.engine, threading.Event(), threading.Event(), []
    compute = old._compute

    def pausing_compute():  # the old engine's steps, held before the third while a stream is in flight
        steps.append(1)
        if len(steps) == 3:
            paused.set()
            assert resume.wait(60)
        return compute()

    with serving(app) as url, httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {keys['ann']}"}) \
            as http, httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {keys['bob']}"}) as other:
        v1 = complete(http)  # served alone, before any promotion
        old._compute = pausing_compute
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            events = stream.iter_lines()
            first = next(e for e in events if e.startswith("data: "))  # the stream has begun
            assert paused.wait(60) and old.stats()["running"] == 1  # ... and is in flight, mid-answer
            assert server.version == "v1"
            registry.promote("tiny", "v2")
            v2 = complete(other)  # the next request switches the server to v2: a new engine answers it
            assert server.version == "v2" and server.engine is not old and v2 != v1
            resume.set()
            chunks = [json.loads(x[6:]) for x in [first, *events] if x.startswith("data: {")]
        assert "error" not in chunks[-1] and chunks[-1]["usage"]["completion_tokens"] == 12  # not cut
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == v1  # v1's tokens, none of v2's
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        server.retired[0].join(timeout=60)  # once its stream ended, the old engine closes
        assert not server.retired[0].is_alive() and complete(http) == v2
