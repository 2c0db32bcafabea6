"""The barge-in echo rule on real audio: the assistant's answer (piper) played on the microphone
stream's clock (parley.voice.echo.Playback), heard back through a simulated room, is an echo; a
user who says the answer's own words while it plays ("Remember that." over "I'll remember that
...") is not, in another voice or in the assistant's very voice; speech while nothing plays
cannot be one. Speech is synthesized here and recognised by Whisper tiny.en."""

import threading
import time

import numpy as np
import pytest

from parley.voice.audio import Clip, resample
from parley.voice.echo import Playback
from parley.voice.vad import BargeIn
from test_voice import needs_espeak

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")

RATE = 16_000
ANSWER = "I'll remember that you prefer answers in bullet points."
PLAYED_AT = 2.0  # seconds of the stream where the answer starts to play


@pytest.fixture(scope="module")
def sounds():
    from parley.voice.asr import load_asr
    from parley.voice.tts import load_tts

    piper, espeak = load_tts("default"), load_tts("espeak:en-gb")
    answer = piper.synthesize(ANSWER)
    user = {name: resample(c.samples, c.rate, RATE) for name, c in
            (("espeak", espeak.synthesize("Remember that.")), ("piper", piper.synthesize("Remember that.")))}
    return answer, user, load_asr("default", window=0)


def room(samples: np.ndarray, seed: int = 0, snr_db: float = 10.0) -> np.ndarray:
    """The speaker's sound at the microphone: quieter, as much reverberation (400 ms) as direct
    sound, and noise `snr_db` under it."""
    rng = np.random.default_rng(seed)
    t = np.arange(6400) / RATE
    tail = rng.standard_normal(len(t)) * np.exp(-6.9 * t / 0.4)
    tail[:16] = 0
    response = tail / np.sqrt(np.sum(tail ** 2))
    response[0] = 1.0
    out = 0.3 * np.convolve(samples, response)[:len(samples)]
    return (out + rng.standard_normal(len(out)) * np.sqrt(np.mean(out ** 2)) * 10 ** (-snr_db / 20)).astype(np.float32)


def played(answer: Clip) -> Playback:
    playback = Playback()
    playback.add(PLAYED_AT, answer)
    return playback


@needs_espeak
def test_the_answer_coming_back_is_an_echo(sounds):
    answer, _, whisper = sounds
    playback, echo = played(answer), room(resample(answer.samples, answer.rate, RATE))
    for delay, seconds in ((0.15, None), (0.4, 1.2)):  # all of it, or 1.2 s of it heard late
        start = PLAYED_AT + delay + (0.5 if seconds else 0)
        heard = echo[round((start - PLAYED_AT - delay) * RATE):][:round(seconds * RATE) if seconds else None]
        match = playback.match(heard, start)
        assert match >= 0.4, (delay, match)
        verdict = BargeIn().verdict(whisper.transcribe(Clip(heard, RATE)), ANSWER, match)
        assert verdict == "echo", (delay, whisper.transcribe(Clip(heard, RATE)).text)


@needs_espeak
def test_a_user_saying_the_answers_words_while_they_play_is_a_barge_in(sounds):
    answer, user, whisper = sounds
    playback, rule = played(answer), BargeIn()
    for name, voice in user.items():
        heard = whisper.transcribe(Clip(voice, RATE))
        assert rule.verdict(heard, ANSWER) == "echo", name  # the words alone: taken for the echo
        # wherever in the answer they are said (the answer's "remember that" plays at ~0.3 s)
        matches = [playback.match(voice, PLAYED_AT + at) for at in np.arange(0.0, 2.5, 0.1)]
        assert max(matches) < 0.25, (name, max(matches))
        assert rule.verdict(heard, ANSWER, max(matches)) == "", name
    # the user over the echo of the answer, 10 dB louder at the microphone: a barge-in
    voice = user["espeak"]
    echo = room(resample(answer.samples, answer.rate, RATE))[:len(voice)]
    echo *= np.sqrt(np.mean(voice ** 2) / np.mean(echo ** 2)) * 10 ** (-10 / 20)
    assert playback.match(echo + voice, PLAYED_AT) < BargeIn().echo_audio


@needs_espeak
def test_nothing_played_then_is_no_echo(sounds):
    answer, _, _ = sounds
    playback = played(answer)
    echo = room(resample(answer.samples, answer.rate, RATE))
    assert playback.match(echo, PLAYED_AT - 5.0) == 0.0  # heard before the answer played
    assert playback.match(echo, PLAYED_AT + 10.0) == 0.0  # long after it
    assert Playback().match(echo, PLAYED_AT) == 0.0


def test_playback_places_clips_on_the_streams_clock():
    playback = Playback(rate=RATE)
    playback.add(1.0, Clip(np.ones(8000, np.float32), RATE))
    playback.add(1.5, Clip(np.full(4000, 2.0, np.float32), 8000))  # resampled to 16 kHz: 8000 samples
    window = playback.window(0.5, 3 * RATE)
    assert window[:8000].sum() == 0 and np.allclose(window[8000:16000], 1.0)
    assert np.allclose(window[16000:24000], 2.0, atol=1e-3) and window[24000:].sum() == 0


class Microphone:
    """A live client's microphone: a 100 ms frame every 100 ms, in real time, of what the user is
    given to say (silence between), with the answer's audio mixed in as a speaker beside it plays
    it: from the frame being sent when it arrives (plus 150 ms of output buffering), after what
    plays before it, through a room (quieter, reverberation, noise 20 dB under it)."""

    def __init__(self, ws):
        self.ws, self.lock, self.echo = ws, threading.Lock(), True
        self.voice, self.sound = np.zeros(0, np.float32), np.zeros(0, np.float32)  # from `sent` on
        self.sent = self.played_to = 0  # samples sent so far; where what was played ends
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def say(self, samples: np.ndarray) -> None:
        with self.lock:
            self.voice = np.concatenate([self.voice, samples])

    def play(self, samples: np.ndarray) -> None:
        if not self.echo:
            return
        with self.lock:
            start = max(self.sent + round(0.15 * RATE), self.played_to)  # in samples of the stream
            self.played_to = start + len(samples)
            heard = room(samples, seed=start, snr_db=20)
            sound = np.zeros(max(len(self.sound), start - self.sent + len(heard)), np.float32)
            sound[:len(self.sound)] = self.sound
            sound[start - self.sent:][:len(heard)] += heard
            self.sound = sound

    def busy(self) -> bool:
        with self.lock:
            return bool(len(self.voice) or len(self.sound))

    def run(self) -> None:
        from test_voice_turns import pcm16

        begin, frame = time.perf_counter(), RATE // 10
        while not self.stop.is_set():
            with self.lock:
                out = np.zeros(frame, np.float32)
                for part in ("voice", "sound"):
                    now = getattr(self, part)[:frame]
                    out[:len(now)] += now
                    setattr(self, part, getattr(self, part)[frame:])
                self.sent += frame
            self.ws.send(pcm16(out))
            time.sleep(max(0.0, begin + self.sent / RATE - time.perf_counter()))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


@pytest.mark.slow  # 13 s on 2 cores; .ci/run runs it (--runslow)
def test_the_live_route_ignores_its_own_audio_and_hears_a_user_repeating_it(tiny768_registry, tmp_path):
    """Over /api/voice, from a client that streams its microphone in real time: the answer's
    audio, played by the client and heard back by its microphone (quieter, a room's reverberation,
    noise), as from a speaker beside it, is ignored as an echo; the user saying the answer's very
    words in the assistant's own voice while the next answer plays is not (the word rule alone took
    it for an echo): it is a barge-in or the next turn."""
    import json

    from test_voice_live import connect, make_site, ws_url
    from test_voice_turns import spoken

    site, key, _ = make_site(tiny768_registry, tmp_path, max_tokens=200)

    def next_of(ws, mic, kinds: tuple[str, ...], seen: list) -> dict:
        """Read messages until one of `kinds` (or an error), playing each piece of audio as it comes."""
        while True:
            message = ws.recv(timeout=120)
            if isinstance(message, bytes):
                pcm = np.frombuffer(message, "<i2").astype(np.float32) / 32768
                mic.play(resample(pcm, seen[-1]["rate"], RATE))
                continue
            seen.append(json.loads(message))
            if seen[-1]["type"] in (*kinds, "error"):
                return seen[-1]

    with site as url, connect(ws_url(url)) as ws:
        ws.send(json.dumps({"type": "start", "api_key": key}))
        seen = []
        while json.loads(ws.recv(timeout=120))["type"] != "ready":
            pass
        mic = Microphone(ws)
        try:
            mic.say(spoken("Turn on the kitchen lights."))
            first = next_of(ws, mic, ("audio",), seen)
            ignored = next_of(ws, mic, ("ignored", "interrupted", "turn"), seen)
            assert ignored["type"] == "ignored" and ignored["reason"] == "echo", (ignored, first["text"])
            if not any(m["type"] == "done" for m in seen):
                next_of(ws, mic, ("done",), seen)
            mic.echo = False  # the next answer is not heard back (headphones): only the user's words
            while mic.busy():  # the echo of the first answer plays out
                time.sleep(0.1)
            mic.say(np.zeros(RATE, np.float32))  # a second of quiet, then the next question
            mic.say(spoken("Turn on the kitchen lights."))
            next_of(ws, mic, ("turn",), seen)  # the question's own turn (echoes ignored before it are skipped)
            first = next_of(ws, mic, ("audio",), seen)  # the next answer plays; the user says its words
            # 1.5 s after it began, as one repeats what one heard: piper says the same text the same
            # way each time, so said at once, within the echo's 0.8 s of delay, it would be the echo's
            # very waveform, which no rule on the audio can tell apart from an echo
            mic.say(np.concatenate([np.zeros(round(1.5 * RATE), np.float32), spoken(first["text"])]))
            heard = next_of(ws, mic, ("ignored", "interrupted", "turn"), seen)
            assert heard["type"] != "ignored", (heard, first["text"])
        finally:
            mic.close()
