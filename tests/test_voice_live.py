"""The live voice route (/api/voice) over real parts: uvicorn on a local port, a `websockets`
client, speech synthesized by piper in the test, the energy endpointer, Whisper tiny.en, the
assistant's turn on the tiny model, and piper speaking the answer back. Barge-in goes through
the engine's cancellation; the bounds (frame size, key, Origin, idle time, utterance length)
each close the socket with a message that says what to do."""

import contextlib
import json
import time

import numpy as np
import pytest

from parley.engine.config import EngineConfig
from parley.serve.app import create_app
from parley.serve.settings import Settings
from parley.store import Store
from parley.voice.asr import wer
from parley.voice.audio import resample
from parley.voice.vad import EndOfTurn
from serving import GatedEngine, serving
from test_serve import make_users

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")
websockets = pytest.importorskip("websockets")
from websockets.sync.client import connect  # noqa: E402

ASK = "Turn on the kitchen lights."
AGAIN = "Stop, tell me about the weather instead."
CHUNK = 3_200  # bytes: 100 ms of 16 kHz PCM16, as a microphone client sends them


@pytest.fixture(scope="module")
def speech():
    """Text -> PCM16 at 16 kHz, then `pause` seconds of silence (the endpointer waits 200-600 ms)."""
    from parley.voice.tts import load_tts

    piper = load_tts("default")

    def pcm(text: str, pause: float = 1.0) -> bytes:
        clip = piper.synthesize(text)
        samples = resample(clip.samples, clip.rate, 16_000)
        samples = samples[:np.flatnonzero(np.abs(samples) > 0.01)[-1] + 1]  # piper's own trailing quiet cut
        samples = np.concatenate([samples, np.zeros(int(pause * 16_000))])
        return (samples.clip(-1, 1) * 32767).round().astype("<i2").tobytes()

    return pcm


def make_site(registry, tmp_path, engine=None, **settings):
    db = str(tmp_path / "p.db")
    keys = make_users(db, ann="user")
    settings = Settings(db=db, home=registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        requests_per_minute=0, stages=["respond"], temperature=0.0, **{"max_tokens": 12, **settings})
    tokenizer = registry.load("tiny768")[1] if engine is not None else None
    return serving(create_app(settings, engine=engine, tokenizer=tokenizer)), keys["ann"], db


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/api/voice"


def send_audio(ws, pcm: bytes) -> None:
    for i in range(0, len(pcm), CHUNK):
        ws.send(pcm[i:i + CHUNK])


def until(ws, kind: str | tuple[str, ...], seen: list, timeout: float = 120) -> dict:
    """Read messages into `seen` (a binary one after its "audio" as that message's "pcm") until
    one of `kind` (a type, or several) or an error."""
    kinds = (kind,) if isinstance(kind, str) else kind
    while True:
        message = ws.recv(timeout=timeout)
        if isinstance(message, bytes):
            seen[-1]["pcm"] = message
            continue
        seen.append(json.loads(message))
        if seen[-1]["type"] in (*kinds, "error"):
            return seen[-1]


def held(engine, what: str = "no generation started"):
    """The engine's first request, once two tokens are out (a GatedEngine(after=2) holds it there)."""
    deadline = time.monotonic() + 60
    while not (engine.requests and len(engine.requests[0].tokens) >= 2):
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
    return engine.requests[0]


def test_a_spoken_turn_is_heard_answered_and_spoken(tiny768_registry, tmp_path, speech):
    site, key, db = make_site(tiny768_registry, tmp_path)
    with site as url, connect(ws_url(url)) as ws:
        ws.send(json.dumps({"type": "start", "api_key": key}))
        seen = []
        ready = until(ws, "ready", seen)
        assert ready["rate"] == 16_000 and ready["voice"] == "joe"
        send_audio(ws, speech(ASK))
        heard = until(ws, "done", seen)
        kinds = [m["type"] for m in seen]
        assert kinds.index("speech_started") < kinds.index("transcript") < kinds.index("turn")
        final = next(m for m in seen if m["type"] == "transcript" and m["final"])
        assert wer(ASK, final["text"]) <= 0.25, final["text"]
        answer = "".join(m["text"] for m in seen if m["type"] == "text")
        audio = [m for m in seen if m["type"] == "audio"]
        assert answer and audio, seen  # the tiny model's words, spoken by piper
        assert all(len(m["pcm"]) == 2 * m["samples"] > 0 and m["rate"] == ready["audio_rate"] for m in audio)
        assert np.abs(np.frombuffer(audio[0]["pcm"], "<i2")).max() > 1000  # speech, not silence
        assert heard["interrupted"] is False
        with Store(db) as store:
            user = store.get_user_by_name("ann")
            (asked, said) = store.messages(user.id, heard["conversation"])
            assert asked.content == final["text"] and said.id == heard["turn_id"]
            assert store.get_feedback(user.id, said.id) is None
        send_audio(ws, speech(AGAIN, pause=0))  # 2.5 s of speech, still going: a partial transcript
        partial = until(ws, "transcript", seen)
        assert partial.get("final") is False and wer(AGAIN, partial["text"]) < 1, partial
        send_audio(ws, b"\0" * 32_000)  # then quiet: the final one, and the next turn
        final = until(ws, "transcript", seen)
        assert final["final"] is True and wer(AGAIN, final["text"]) <= 0.34, final
        assert until(ws, "done", seen)["conversation"] == heard["conversation"]
        ws.send(json.dumps({"type": "stop"}))


def test_speaking_over_the_answer_cancels_it_within_one_engine_step(tiny768_registry, tmp_path, speech):
    model = tiny768_registry.load("tiny768")[0]
    engine = GatedEngine(model, after=2)  # the answer holds after two tokens, mid-turn
    site, key, db = make_site(tiny768_registry, tmp_path, engine=engine, max_tokens=200)
    try:
        with site as url, connect(ws_url(url), additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            ws.send(json.dumps({"type": "start"}))
            seen = []
            until(ws, "ready", seen)
            send_audio(ws, speech(ASK))
            started = until(ws, "turn", seen)
            held(engine)  # held at the gate
            (request,) = engine.requests
            before = len(request.tokens)
            send_audio(ws, speech(AGAIN))  # the user speaks over the answer
            interrupted = until(ws, "interrupted", seen)
            assert interrupted["type"] == "interrupted" and request.cancelled, seen  # the engine's request was cancelled while its step was held
            engine.gate.set()
            assert request.wait(timeout=60) == "cancelled", seen
            assert len(request.tokens) <= before + 1, (before, len(request.tokens))  # only the step under way finished
            done = until(ws, "done", seen)
            assert done["type"] == "done", seen  # an error says what failed (it failed 2 runs in 31 once)
            assert done["interrupted"] is True and done["conversation"] == started["conversation"], seen
            second = until(ws, "done", seen)  # the new utterance is the next turn, in the same conversation
            assert second["type"] == "done", (second, seen)  # the error event itself first: seen is cut when shown
            finals = [m["text"] for m in seen if m["type"] == "transcript" and m["final"]]
            assert len(finals) == 2 and wer(AGAIN, finals[1]) <= 0.34, finals
            assert second["conversation"] == started["conversation"] and second["interrupted"] is False, seen
        with Store(db) as store:
            user = store.get_user_by_name("ann")
            messages = store.messages(user.id, started["conversation"])
            assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"], (messages, seen)
            assert messages[1].content.endswith("[interrupted]") and messages[1].id == done["turn_id"]
            feedback = store.get_feedback(user.id, done["turn_id"])
            assert (feedback.kind, feedback.rating) == ("barge-in", -1)
            assert store.get_feedback(user.id, second["turn_id"]) is None
    finally:
        engine.gate.set()
        engine.close()


@pytest.fixture(scope="module")
def bounded(tiny768_registry, tmp_path_factory):
    site, key, db = make_site(tiny768_registry, tmp_path_factory.mktemp("bounded"), voice_idle_seconds=1,
                              voice_max_utterance_seconds=1)
    with site as url:
        yield url, key


def refusal(ws) -> dict:
    message = json.loads(ws.recv(timeout=60))
    assert message["type"] == "error"
    with pytest.raises(websockets.ConnectionClosed) as closed:
        ws.recv(timeout=60)
    assert closed.value.rcvd.code == 1008
    return message


@pytest.mark.parametrize("start, code, words", [
    ({"type": "start", "api_key": "nope"}, "invalid_api_key", "invalid API key"),
    ({"type": "start"}, "missing_api_key", "Authorization"),
    ({"type": "hello"}, "invalid_message", '"type": "start"'),
    ({"type": "start", "api_key": "KEY", "voice": "../x.onnx"}, "invalid_value", "no voice"),
    ({"type": "start", "api_key": "KEY", "conversation": 999}, "not_found", "conversation"),
])
def test_a_bad_start_is_refused_with_a_reason(bounded, start, code, words):
    url, key = bounded
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({k: key if v == "KEY" else v for k, v in start.items()}))
        error = refusal(ws)
        assert error["code"] == code and words in error["message"]


def test_a_text_message_nested_past_the_json_parsers_depth_is_refused_with_a_reason(bounded):
    url, _ = bounded
    with connect(ws_url(url)) as ws:
        ws.send("[" * 100_000)  # json.loads recurses once per level: a RecursionError, not a ValueError
        error = refusal(ws)
        assert error["code"] == "too_deep" and "100000 levels" in error["message"], error


def nested(levels: int) -> list:
    value = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_a_text_message_is_nested_at_most_64_deep_as_an_http_body(bounded):
    """A start or stop message nested 65 deep (under the parser's recursion limit) was read; the socket now
    bounds its text messages as JsonBodyCheck bounds HTTP bodies (64 levels), answered with an error message."""
    url, key = bounded
    with connect(ws_url(url)) as ws:  # 64 levels: the object, and 63 in one of its fields
        ws.send(json.dumps({"type": "start", "api_key": key, "extra": nested(63)}))
        assert until(ws, "ready", [])["type"] == "ready"
    for first in (True, False):
        with connect(ws_url(url)) as ws:
            if not first:  # the stop message of a session going on
                ws.send(json.dumps({"type": "start", "api_key": key}))
                until(ws, "ready", [])
            ws.send(json.dumps({"type": "start" if first else "stop", "api_key": key, "extra": nested(64)}))
            error = refusal(ws)
            assert error["code"] == "too_deep", error
            assert error["message"] == ("a text message's JSON has arrays and objects 65 levels inside each other; "
                                        "this server reads at most 64: send flatter JSON")


def test_frames_must_be_pcm16_of_at_most_a_second(bounded):
    url, key = bounded
    for frame, words in ((b"\0" * 32_002, "at most 32000"), (b"\0" * 3, "even number")):
        with connect(ws_url(url)) as ws:
            ws.send(json.dumps({"type": "start", "api_key": key}))
            until(ws, "ready", [])
            ws.send(frame)
            error = refusal(ws)
            assert error["code"] == "invalid_audio" and words in error["message"]


def test_an_idle_session_is_closed(bounded):
    url, key = bounded
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"type": "start", "api_key": key}))
        until(ws, "ready", [])
        assert refusal(ws)["code"] == "idle_timeout"


def test_a_long_utterance_is_cut_and_answered(bounded, speech):
    url, key = bounded
    pcm = speech(AGAIN, pause=0)  # ~2.5 s of speech, no pause: cut at 1 s (made first: the session idles 1 s)
    with connect(ws_url(url)) as ws:
        ws.send(json.dumps({"type": "start", "api_key": key}))
        until(ws, "ready", [])
        send_audio(ws, pcm)
        seen = []
        final = until(ws, "transcript", seen)
        while not final.get("final"):
            final = until(ws, "transcript", seen)
        assert final["final"] and 0 < len(final["text"].split()) < len(AGAIN.split())


def test_a_foreign_page_cannot_open_the_socket(bounded):
    """The browser guard's Origin rule holds for WebSockets: only the server's own page."""
    url, key = bounded
    port = url.rsplit(":", 1)[1]
    with pytest.raises(websockets.InvalidStatus) as refused:
        connect(ws_url(url), origin="http://evil.example")
    assert refused.value.response.status_code == 403
    with pytest.raises(websockets.InvalidStatus):
        connect(ws_url(url), additional_headers={"Sec-Fetch-Site": "cross-site"})
    with connect(ws_url(url), origin=f"http://127.0.0.1:{port}") as ws:  # the server's own page
        ws.send(json.dumps({"type": "start", "api_key": key}))
        assert until(ws, "ready", [])["type"] == "ready"


def test_a_finished_sentence_ends_the_turn_after_a_short_quiet(tiny768_registry, tmp_path, speech):
    """The end-of-turn rule (EndOfTurn): 300 ms of quiet, less than the endpointer's 600 ms wait,
    and no audio after it: the turn is answered because the transcript reads as finished.
    The same quiet after a sentence cut off on "to" is not an end: that turn waits for more quiet.
    (Whisper may complete a cut-off sentence; "I would like to" it leaves open, as "I would like to.")"""
    site, key, _ = make_site(tiny768_registry, tmp_path)
    with site as url, connect(ws_url(url)) as ws:
        ws.send(json.dumps({"type": "start", "api_key": key}))
        until(ws, "ready", [])
        send_audio(ws, speech(ASK, pause=0.3))
        seen = []
        final = until(ws, "transcript", seen)
        while not final.get("final"):
            final = until(ws, "transcript", seen)
        assert wer(ASK, final["text"]) <= 0.25
        until(ws, "done", seen)
        send_audio(ws, speech("I would like to", pause=0.3))
        with pytest.raises(TimeoutError):  # waits: "to" wants a next word
            while True:
                message = ws.recv(timeout=5)
                if not isinstance(message, bytes) and json.loads(message).get("final"):
                    raise AssertionError(f"the turn ended on a dangling word: {message}")
        send_audio(ws, b"\0" * 16_000)  # 500 ms more quiet: the plain wait ends it
        final = until(ws, "transcript", seen)
        while not final.get("final"):
            final = until(ws, "transcript", seen)
        assert "like to" in final["text"].lower() and not EndOfTurn.finished(final["text"])


def test_speech_over_a_turn_still_being_transcribed_joins_the_next_utterance(tiny768_registry, tmp_path, speech):
    """Two utterances sent at once, 700 ms apart: the second starts while the first is still in
    Whisper (milliseconds of frames against hundreds of milliseconds of recognition), so no turn
    is started for the first; it is said with the second, as one turn."""
    site, key, db = make_site(tiny768_registry, tmp_path)
    with site as url, connect(ws_url(url)) as ws:
        ws.send(json.dumps({"type": "start", "api_key": key}))
        until(ws, "ready", [])
        send_audio(ws, speech(ASK, pause=0.7) + speech(AGAIN))
        seen = []
        done = until(ws, "done", seen)
        (final,) = [m["text"] for m in seen if m["type"] == "transcript" and m["final"]]
        assert "kitchen" in final.lower() and "weather" in final.lower(), final
        assert [m["type"] for m in seen].count("turn") == 1 and done["interrupted"] is False
        with Store(db) as store:
            user = store.get_user_by_name("ann")
            assert [m.content for m in store.messages(user.id, done["conversation"])][0] == final


@contextlib.contextmanager
def gated(registry, tmp_path, max_tokens: int):
    """A live session, started and ready, on an engine that holds every answer after two tokens
    until its gate is set. Yields (ws, messages seen, engine, the store's path)."""
    engine = GatedEngine(registry.load("tiny768")[0], after=2)
    site, key, db = make_site(registry, tmp_path, engine=engine, max_tokens=max_tokens)
    try:
        with site as url, connect(ws_url(url)) as ws:
            ws.send(json.dumps({"type": "start", "api_key": key}))
            seen = []
            until(ws, "ready", seen)
            yield ws, seen, engine, db
    finally:
        engine.gate.set()
        engine.close()


@contextlib.contextmanager
def guessed(registry, tmp_path, speech):
    """`gated`, the question sent with 120 ms of quiet after it: past the guess (100 ms), short of
    the end of the turn (200 ms). Yields (ws, messages seen, engine, the engine request the guess
    started, held after two tokens, the store's path)."""
    with gated(registry, tmp_path, max_tokens=12) as (ws, seen, engine, db):
        send_audio(ws, speech(ASK, pause=0.12))
        yield ws, seen, engine, held(engine, "no generation started on the guess"), db


def test_a_turn_started_on_the_guess_is_kept_when_the_transcript_holds(tiny768_registry, tmp_path, speech):
    """Speculative start: the model is already answering the guess, unseen, before the end of the
    turn. 200 ms more quiet ends the turn on the same transcript: that generation is the turn (one
    engine request), and its messages, held until then, arrive in order."""
    with guessed(tiny768_registry, tmp_path, speech) as (ws, seen, engine, request, db):
        send_audio(ws, b"\0" * 6_400)  # 200 ms more quiet: the turn ends, on the guess's transcript
        final = until(ws, "transcript", seen)
        assert final["final"] is True and wer(ASK, final["text"]) <= 0.25, final
        engine.gate.set()
        done = until(ws, "done", seen)
        assert done["type"] == "done" and done["interrupted"] is False, done
        assert engine.requests == [request] and request.wait(timeout=60) != "cancelled"
        kinds = [m["type"] for m in seen]
        assert kinds.index("transcript") < kinds.index("turn") < kinds.index("audio") < kinds.index("done")
        marks = next(m for m in seen if m["type"] == "audio")["latency"]["marks"]
        assert marks["speculated"] < marks["decided"] <= marks["sending"], marks
    with Store(db) as store:
        user = store.get_user_by_name("ann")
        (asked, said) = store.messages(user.id, done["conversation"])
        assert asked.content == final["text"] and said.id == done["turn_id"]


def test_a_turn_started_on_the_guess_is_dropped_unsent_and_unsaved_when_speech_goes_on(
        tiny768_registry, tmp_path, speech):
    """The same guess, but the user goes on after the pause: the generation started on it is
    cancelled through the engine's cancellation (at most the step under way finishes), none of its
    messages is sent and nothing of it is saved; the whole utterance is the one turn."""
    with guessed(tiny768_registry, tmp_path, speech) as (ws, seen, engine, request, db):
        before = len(request.tokens)
        send_audio(ws, speech(AGAIN))  # the user goes on: the same utterance
        deadline = time.monotonic() + 60
        while not request.cancelled:
            assert time.monotonic() < deadline, "the speculative generation was not cancelled"
            time.sleep(0.01)
        engine.gate.set()
        assert request.wait(timeout=60) == "cancelled" and len(request.tokens) <= before + 1
        done = until(ws, "done", seen)
        assert done["type"] == "done" and done["interrupted"] is False, done
        kinds = [m["type"] for m in seen]
        (final,) = [m["text"] for m in seen if m["type"] == "transcript" and m["final"]]
        assert "kitchen" in final.lower() and "weather" in final.lower(), final
        assert kinds.count("turn") == kinds.count("done") == 1 and len(engine.requests) == 2
        assert "interrupted" not in kinds and "resumed" not in kinds
    with Store(db) as store:
        user = store.get_user_by_name("ann")
        (conversation,) = store.list_conversations(user.id)  # the guess's was never kept
        assert conversation.id == done["conversation"]
        assert [m.content for m in store.messages(user.id, conversation.id)][0] == final


def test_the_first_piece_is_made_from_the_draft_and_given_only_for_the_same_checked_text():
    """HeadStart (parley.voice.tts): the draft's first piece ("the first 4 words of a sentence of
    8 or more", as `sentences` cuts it) is synthesized as soon as the draft shows it, before the
    sentence is finished, and given for that same checked piece only; a different checked piece
    (a rewritten answer) gets nothing, and once the caller has asked, a late draft starts nothing."""
    import threading

    from parley.voice.tts import HeadStart, load_tts

    tts = load_tts("default")
    head = HeadStart(tts, threading.Lock(), first_clause=4, first_words=4)
    worker = threading.Thread(target=head.run)
    worker.start()
    for word in "I'm here to assist you in any way".split():  # no sentence end yet: the checker holds it
        head.drafts.put(word + " ")
    worker.join(timeout=60)  # done before the draft ended: the piece was known at its 8th word
    assert not worker.is_alive()
    clip, (start, end) = head.take("I'm here to assist")
    assert clip.rate == tts.rate and np.abs(clip.samples).max() > 0.05 and start <= end
    head.close()

    rewritten = HeadStart(tts, threading.Lock(), first_clause=4, first_words=4)
    worker = threading.Thread(target=rewritten.run)
    worker.start()
    for word in "I'm here to assist you in any way".split():
        rewritten.drafts.put(word + " ")
    worker.join(timeout=60)
    assert rewritten.take("I am here to assist") is None  # not what was drafted: the caller makes it

    late = HeadStart(tts, threading.Lock(), first_clause=4, first_words=4)
    assert late.take("Hello there.") is None  # asked before the draft had a piece
    late.drafts.put("Hello there. ")
    late.close()
    late.run()
    assert late._ahead is None  # nothing synthesized after the caller went ahead without it
