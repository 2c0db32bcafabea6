"""A spoken turn of `parley chat` (audio in, spoken answer out) over a real assistant: the tiny random
model, the real store and embedder, piper speech made in the test, Whisper tiny.en."""

import io

import pytest

from parley.chat import Session
from parley.cli import main
from parley.engine.engine import Engine
from parley.pipeline.assistant import Assistant, AssistantConfig
from parley.voice.asr import wer
from parley.voice.audio import read_wav, wav_bytes
from parley.voice.main import voice_chat
from parley.voice.tts import load_tts
from test_voice import needs_espeak

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")

QUESTION = "What is the weather like in Lisbon today?"


@pytest.fixture
def session(tiny_chat_model, embedder, tmp_path):
    model, tokenizer = tiny_chat_model
    cfg = AssistantConfig(stages=["safety_in", "respond", "safety_out"], db=str(tmp_path / "p.db"), max_tokens=24,
                          temperature=0)
    s = Session(Assistant.build(cfg, engine=Engine(model), tokenizer=tokenizer, embedder=embedder))
    yield s
    s.close()


@needs_espeak
def test_a_spoken_question_gets_a_saved_answer_and_a_spoken_reply(session, tmp_path):
    question, answer = tmp_path / "q.wav", tmp_path / "a.wav"
    question.write_bytes(wav_bytes(load_tts("default").synthesize(QUESTION)))
    out = io.StringIO()
    assert voice_chat(session, str(question), str(answer), voice="espeak", stdout=out) == 0
    heard = out.getvalue().splitlines()[0].removeprefix("you (heard)> ")
    assert wer(QUESTION, heard) <= 0.25
    saved = session.store.messages(session.user_id, session.conversation_id)
    assert [m.role for m in saved] == ["user", "assistant"] and saved[0].content == heard
    assert "wrote " in out.getvalue() and read_wav(answer.read_bytes()).rate == 22_050
    if any(c.isalnum() for c in saved[1].content):  # the random model's answer had words to speak
        assert read_wav(answer.read_bytes()).seconds > 0.2


def test_spoken_turn_settings_are_checked(tmp_path, capsys):
    assert main(["chat", "--audio-out", str(tmp_path / "a.wav")]) == 2
    assert "give audio_in" in capsys.readouterr().err
    assert main(["chat", "--audio-in", str(tmp_path / "missing.wav")]) == 2
    assert "no audio file" in capsys.readouterr().err
    assert main(["chat", "--server", "http://127.0.0.1:9", "--audio-in", str(tmp_path / "missing.wav")]) == 2
