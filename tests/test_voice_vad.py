"""Voice activity detection on piper speech with silence and noise between utterances: both detectors
find each utterance, and the live endpointer hands each over before the stream ends."""

import numpy as np
import pytest

from parley.voice.audio import Clip, resample
from parley.voice.tts import load_tts
from parley.voice.vad import EnergyVAD, Endpointer, SileroVAD

pytest.importorskip("piper")
RATE = 16_000


@pytest.fixture(scope="module")
def stream():
    """Two utterances in 1 s / 1.2 s / 0.8 s of quiet noise (-60 dBFS), and where their speech is."""
    tts = load_tts("default")
    parts = [resample(c.samples, c.rate, RATE) for c in
             (tts.synthesize("Hello there, how are you doing today?"), tts.synthesize("Please call my sister."))]
    quiet = [np.zeros(int(s * RATE), np.float32) for s in (1.0, 1.2, 0.8)]
    audio = np.concatenate([quiet[0], parts[0], quiet[1], parts[1], quiet[2]])
    audio += 0.001 * np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32)
    truth, at = [], len(quiet[0])
    for part, gap in zip(parts, quiet[1:]):
        loud = np.nonzero(np.abs(part) > 0.01)[0]
        truth.append(((at + loud[0]) / RATE, (at + loud[-1]) / RATE))
        at += len(part) + len(gap)
    return Clip(audio, RATE), truth


@pytest.mark.parametrize("vad", [EnergyVAD(), SileroVAD()], ids=["energy", "silero"])
def test_each_utterance_is_found(stream, vad):
    clip, truth = stream
    found = vad.segments(clip)
    assert len(found) == 2, found
    for (start, end), (s, e) in zip(found, truth):
        assert s - 0.25 <= start <= s and e <= end <= e + 0.4  # covers the speech, with a little margin


def test_the_endpointer_cuts_utterances_live(stream):
    clip, truth = stream
    cut, heard = Endpointer(EnergyVAD(), RATE), []
    for i in range(0, len(clip.samples), 480):  # 30 ms chunks, as a microphone gives them
        heard += [(i / RATE, u) for u in cut.push(clip.samples[i:i + 480])]
    assert not cut.flush() and len(heard) == 2
    for (at, u), (s, e) in zip(heard, truth):
        assert u.start <= s and e <= u.end and at < e + 0.7  # handed over ~min_silence after the speech
        assert u.clip.seconds == pytest.approx(u.end - u.start, abs=0.03)
    assert Endpointer(EnergyVAD(), RATE).push(np.zeros(RATE, np.float32)) == []  # silence: nothing


def test_a_click_is_not_an_utterance():
    audio = np.zeros(RATE, np.float32)
    audio[8000:8000 + 800] = 0.5  # 50 ms
    assert EnergyVAD().segments(Clip(audio, RATE)) == []


def test_end_of_turn_waits_less_after_a_finished_sentence():
    from parley.voice.vad import EndOfTurn

    rule = EndOfTurn(short_ms=200, long_ms=600)
    for text in ("Turn on the kitchen lights.", "What time is it?", "Play some music, please!", '"Hello."',
                 "What are you capable of?", "Who is this gift for?"):
        assert rule.finished(text) and rule.wait_ms(text) == 200, text
    for text in ("", "Turn on the.", "I want to.", "and then", "Tell me about", "Um.", "Remember that.",
                 "Can you tell me the?", "What about my?", "Is it this or?", "Can you explain how to?"):
        assert not rule.finished(text) and rule.wait_ms(text) == 600, text
