"""Turn-taking on the live voice route with real audio: a pause inside a sentence does not end the
turn (or takes back the turn it began), and a noise or the assistant's own voice over an answer
is no barge-in (parley.voice.vad.BargeIn), while the user's words are. Speech is synthesized by
piper and espeak-ng in the test and recognised by Whisper tiny.en; the turn runs on the tiny model."""

import json
import threading
import time

import numpy as np
import pytest

from parley.store import Store
from parley.voice.asr import Segment, Transcription
from parley.voice.audio import Clip, resample
from parley.voice.vad import BargeIn
from serving import GatedEngine
from test_voice import needs_espeak
from test_voice_live import (CHUNK, connect, gated, held, make_site, send_audio,  # noqa: F401 (speech: a fixture)
                             speech, until, ws_url)

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")

RATE = 16_000
ECHO = "The weather in Lisbon is sunny and warm today."


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    """A burst of white noise between short silences: a door, a cough, a bump of the microphone."""
    burst = 0.3 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))
    return np.concatenate([np.zeros(1600), burst, np.zeros(3200)]).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return (samples.clip(-1, 1) * 32767).round().astype("<i2").tobytes()


def spoken(text: str, voice: str = "default") -> np.ndarray:
    from parley.voice.tts import load_tts

    clip = load_tts(voice).synthesize(text)
    samples = resample(clip.samples, clip.rate, RATE)
    return np.concatenate([samples[:np.flatnonzero(np.abs(samples) > 0.01)[-1] + 1], np.zeros(3200)])


@pytest.fixture(scope="module")
def whisper():
    from parley.voice.asr import load_asr

    return load_asr("default", window=0)


@needs_espeak
def test_noise_and_the_assistants_own_voice_are_no_barge_in_but_words_are(whisper):
    rule = BargeIn()

    def verdict(samples):
        return rule.verdict(whisper.transcribe(Clip(samples.astype(np.float32), RATE)), ECHO)

    assert verdict(noise(0.4)) == "noise"  # Whisper writes "You" for it, but says it heard no speech
    assert verdict(noise(0.3, seed=5)) == "noise"
    assert verdict(spoken(ECHO)) == "echo"  # the answer coming back through the microphone
    assert verdict(spoken("Wait, stop. Tell me about the weather instead.", "espeak:en-gb")) == ""
    assert verdict(spoken("Stop!", "espeak:en-us")) == ""
    assert rule.verdict(Transcription("sunny"), ECHO) == "echo"
    assert rule.verdict(Transcription("I would like to"), ECHO) == ""


def test_a_transcription_is_judged_with_its_own_segments():
    """Whisper on a noise burst writes "You" and says it is not sure there was speech, or, on a
    slightly different cut, gives no segment at all: either is a noise. The live route once judged
    the text of its early end-of-turn pass with the segments of a later pass on the final cut
    ("You" with none), and so took a noise for a barge-in (the hang of the test below)."""
    rule = BargeIn()
    unsure = Transcription("You", [Segment(0.0, 0.4, "You", avg_logprob=-0.9, no_speech_prob=0.8)])
    assert rule.verdict(unsure, "") == "noise" and rule.verdict(Transcription(""), "") == "noise"
    assert rule.verdict(Transcription("You", [Segment(0.0, 0.4, "You", no_speech_prob=0.1)]), "") == ""


def send_live(ws, pcm: bytes) -> None:
    """Send in real time, as a microphone does: a 100 ms frame every 100 ms."""
    start = time.perf_counter()
    for i in range(0, len(pcm), CHUNK):
        time.sleep(max(0.0, start + i / CHUNK * 0.1 - time.perf_counter()))
        ws.send(pcm[i:i + CHUNK])


def test_a_pause_inside_a_sentence_does_not_split_the_turn(tiny768_registry, tmp_path):
    """"Set a timer" reads as finished to the end-of-turn rule (Whisper writes "Set a timer."), so
    250 ms of quiet may start a turn; the words that follow take it back before it has shown
    anything (generation is held here, as a slow model would be), and one turn answers both."""
    model = tiny768_registry.load("tiny768")[0]
    engine = GatedEngine(model, after=0)
    site, key, db = make_site(tiny768_registry, tmp_path, engine=engine)
    audio = np.concatenate([spoken("Set a timer")[:-3200], np.zeros(4000), spoken("for ten minutes."),
                            np.zeros(RATE)])
    try:
        with site as url, connect(ws_url(url)) as ws:
            ws.send(json.dumps({"type": "start", "api_key": key}))
            until(ws, "ready", [])
            sender = threading.Thread(target=send_live, args=(ws, pcm16(audio)))
            sender.start()
            seen = []
            while (done := until(ws, ("resumed", "interrupted", "ignored", "transcript", "done"), seen))["type"] \
                    not in ("done", "error"):  # the answer is held until the words after the pause are judged
                if done["type"] != "transcript" or done["final"] and "minutes" in done["text"].lower():
                    engine.gate.set()  # (not when the audio is sent: a loaded machine's Whisper may take longer)
            sender.join()
        kinds = [m["type"] for m in seen]
        assert kinds.count("done") == 1 and "interrupted" not in kinds, kinds
        (final,) = [m["text"] for m in seen if m["type"] == "transcript" and m["final"]][-1:]
        assert "timer" in final.lower() and "minutes" in final.lower(), seen
        with Store(db) as store:
            user = store.get_user_by_name("ann")
            assert [c.id for c in store.list_conversations(user.id)] == [done["conversation"]]
            asked = store.messages(user.id, done["conversation"])[0].content.lower()
            assert "timer" in asked and "minutes" in asked
    finally:
        engine.gate.set()
        engine.close()


@needs_espeak
def test_a_noise_over_the_answer_stops_nothing_and_words_do(tiny768_registry, tmp_path, speech):  # noqa: F811
    with gated(tiny768_registry, tmp_path, max_tokens=200) as (ws, seen, engine, _):  # held mid-turn
        send_audio(ws, speech("Turn on the kitchen lights."))
        until(ws, "turn", seen)
        held(engine)  # held at the gate
        # then quiet, so the utterance ends; in real time, so the early end-of-turn guess (at
        # 100 ms of quiet) is under way or done when the utterance ends at 600 ms: its
        # transcript ("You", Whisper unsure there is speech) is the one the rule judges
        send_live(ws, pcm16(noise(0.4)) + b"\0" * 32_000)
        ignored = until(ws, ("ignored", "interrupted"), seen)
        assert ignored["type"] == "ignored" and ignored.get("reason") == "noise", seen
        assert not engine.requests[0].cancelled
        send_audio(ws, pcm16(spoken("Wait, stop. Tell me about the weather instead.", "espeak:en-gb")))
        until(ws, "interrupted", seen)
        assert engine.requests[0].cancelled
        engine.gate.set()
        done = until(ws, "done", seen, timeout=30)
        assert done.get("interrupted") is True, [m["type"] for m in seen]


def test_a_tentative_turn_writes_nothing_until_it_is_kept(tmp_path, embedder):
    """Turn.tentative, what the live route's speculative turn runs with (parley.pipeline.runner):
    its writes wait for the decision. Dropped, a memory command writes no fact and the turn saves
    no exchange, its new conversation deleted; kept, the same turn writes both."""
    from parley.pipeline.assistant import Assistant, AssistantConfig
    from parley.pipeline.runner import Tentative, Turn

    assistant = Assistant.build(AssistantConfig(stages=["state"]), embedder=embedder)
    db = tmp_path / "p.db"
    with Store(db) as store:
        uid = store.add_user("u").id

    def say(turn: Turn) -> None:  # in a thread of its own, with its own connection, as a server's turn
        with Store(db) as store:
            turn.store = store
            list(assistant.say(turn, "Remember that I like tea"))

    for keep in (False, True):
        tentative = Tentative()
        turn = Turn(uid, tentative=tentative)
        saying = threading.Thread(target=say, args=(turn,))
        saying.start()  # it waits for the decision before its first write
        (tentative.keep if keep else tentative.drop)()
        saying.join(timeout=60)
        assert not saying.is_alive()
        with Store(db) as store:
            facts = [f.text for f in store.list_memory(uid)]
            if not keep:
                assert facts == [] and store.list_conversations(uid) == [] and turn.message_id is None
    with Store(db) as store:
        (conversation,) = store.list_conversations(uid)
        assert [m.role for m in store.messages(uid, conversation.id)] == ["user", "assistant"]
    assert facts == ["I like tea"]
    assert Tentative(timeout_s=0.01).wait() is False  # never decided: dropped, no thread waits for ever
