"""Voice activity detection: where the speech is in a clip, and, live, when an utterance has ended.

    EnergyVAD().segments(clip)              # [(start_s, end_s), ...]: frame energy over a tracked noise floor
    SileroVAD().segments(clip)              # the same from Silero VAD v6 (ONNX, bundled with faster-whisper, MIT)
    cut = Endpointer(EnergyVAD(), rate=16_000)
    for chunk in microphone:                # any chunk size
        for utterance in cut.push(chunk):   # an Utterance as soon as `min_silence_ms` of quiet follows it
            transcribe(utterance.clip)

The energy detector needs nothing but numpy and decides each 20 ms frame as it arrives, so it
can end a turn live; it is fooled by loud steady noise (music, a fan close to the microphone),
where the trained Silero model is not. benchmarks/voice.py measures both against the known
speech regions of synthesized speech mixed with noise at several signal-to-noise ratios.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from parley.voice.asr import Transcription, normalize
from parley.voice.audio import Clip


class VAD(Protocol):
    def segments(self, clip: Clip) -> list[tuple[float, float]]: ...


@dataclass(frozen=True)
class Utterance:
    start: float  # seconds from the start of the stream
    end: float
    clip: Clip


@dataclass
class EnergyVAD:
    """Speech is a frame whose energy is `margin_db` over the noise floor (and over `min_db`)."""

    frame_ms: int = 20
    margin_db: float = 12.0
    min_db: float = -50.0  # never call quieter frames speech, however quiet the room
    min_speech_ms: int = 120  # shorter bursts (a click, a cough) are not an utterance
    min_silence_ms: int = 500  # this much quiet ends an utterance
    pad_ms: int = 100  # kept on both sides of an utterance, for soft word onsets and endings

    def segments(self, clip: Clip) -> list[tuple[float, float]]:
        cut = Endpointer(self, clip.rate)
        found = cut.push(clip.samples) + cut.flush()
        return [(u.start, u.end) for u in found]


class Endpointer:
    """Cuts utterances from a stream of samples, frame by frame (see the module docstring)."""

    def __init__(self, vad: EnergyVAD, rate: int):
        self.vad, self.rate = vad, rate
        self.frame = rate * vad.frame_ms // 1000
        self.floor = None  # the noise floor in dB: follows quiet frames down at once, up slowly
        self.pending = np.zeros(0, np.float32)  # samples not yet a whole frame
        self.history: list[np.ndarray] = []  # frames of the utterance so far (with the lead-in)
        self.frames_seen = 0
        self.speech_frames = self.quiet_frames = 0
        self.spoken = 0  # speech frames heard in all (never reset): "was anything said since?"
        self.start: int | None = None  # frame index where the current utterance began

    def _is_speech(self, frame: np.ndarray) -> bool:
        db = 10 * np.log10(float(np.mean(frame.astype(np.float64) ** 2)) + 1e-10)
        if self.floor is None:
            self.floor = db
        speech = db > max(self.floor + self.vad.margin_db, self.vad.min_db)
        # a floor that rises 0.5 dB a second follows a room getting louder, not a long sentence
        self.floor = min(db, self.floor + 0.5 * self.vad.frame_ms / 1000) if not speech else self.floor
        return speech

    def push(self, samples: np.ndarray) -> list[Utterance]:
        out, ms = [], self.vad.frame_ms
        pad = self.vad.pad_ms // ms
        self.pending = np.concatenate([self.pending, samples.astype(np.float32)])
        while len(self.pending) >= self.frame:
            frame, self.pending = self.pending[:self.frame], self.pending[self.frame:]
            speech = self._is_speech(frame)
            self.spoken += speech
            self.history.append(frame)
            if self.start is None:
                if speech:
                    self.speech_frames += 1
                    if self.speech_frames * ms >= self.vad.min_speech_ms:  # long enough: an utterance began
                        self.start = max(0, self.frames_seen + 1 - self.speech_frames - pad)
                        self.quiet_frames = 0
                else:
                    self.speech_frames = 0
                    del self.history[:-pad - 1 - int(self.vad.min_speech_ms / ms)]  # keep only the lead-in
            else:
                self.quiet_frames = 0 if speech else self.quiet_frames + 1
                if self.quiet_frames * ms >= self.vad.min_silence_ms:
                    out.append(self._cut(self.frames_seen + 1 - self.quiet_frames + pad))
            self.frames_seen += 1
        return out

    @property
    def quiet_ms(self) -> int:
        """How long the open utterance has been quiet (0 when speech is heard, or none is open)."""
        return self.quiet_frames * self.vad.frame_ms if self.start is not None else 0

    @property
    def in_speech(self) -> bool:
        """An utterance has begun and not yet ended (what a live turn's barge-in listens for)."""
        return self.start is not None

    @property
    def heard_start(self) -> float:
        """Where `heard()` begins, in seconds of the stream."""
        return (self.frames_seen - len(self.history)) * self.vad.frame_ms / 1000

    def heard(self) -> np.ndarray:
        """The samples of the utterance so far (with its lead-in): what a partial transcript reads."""
        return np.concatenate(self.history) if self.start is not None and self.history else np.zeros(0, np.float32)

    def flush(self) -> list[Utterance]:
        """The utterance still open when the stream ends, if any."""
        if self.start is None:
            return []
        return [self._cut(self.frames_seen - self.quiet_frames + self.vad.pad_ms // self.vad.frame_ms)]

    def _cut(self, end: int) -> Utterance:
        end = min(end, self.frames_seen + 1)
        first = self.frames_seen + 1 - len(self.history)  # the frame index of history[0]
        kept = self.history[max(0, self.start - first):max(0, end - first)]
        step = self.vad.frame_ms / 1000
        utterance = Utterance(round(self.start * step, 3), round(end * step, 3),
                              Clip(np.concatenate(kept) if kept else np.zeros(0, np.float32), self.rate))
        self.history, self.start, self.speech_frames, self.quiet_frames = [], None, 0, 0
        return utterance


_FINAL = re.compile(r"[.?!][\"')\]]*\s*$")
_DANGLING = re.compile(r"\b(a|an|the|and|or|but|so|to|of|in|on|at|for|with|my|your|is|are|was|because|if|that|"
                       r"about|from|like|um|uh|er)\W*$", re.IGNORECASE)
# After a question mark a preposition or "that" ends many whole questions ("what are you capable
# of?", "who is it for?"); only words that cannot end one still mean more is coming, and "to",
# where Whisper writes "Can you explain how to?" for a pause inside a question.
_DANGLING_IN_QUESTION = re.compile(r"\b(a|an|the|and|or|but|because|if|to|my|your|um|uh|er)\W*$", re.IGNORECASE)


@dataclass
class EndOfTurn:
    """When the user has finished speaking, sooner than a fixed wait: after `short_ms` of quiet
    the utterance so far is transcribed, and if the transcript reads as finished (Whisper ends
    it with . ? or ! and it does not end on a word that needs a next one: "the", "and", "to";
    after a "?" only articles, conjunctions, "to", "my"/"your" and fillers count, since "what is it
    for?" is whole) the turn ends there; otherwise it ends after `long_ms` of quiet, as the plain endpointer's
    wait. The transcription starts at `guess_ms` of quiet (a pause that may still be inside a
    sentence: it decides nothing before `short_ms`) and is the turn's own transcript either way
    when no speech came after it, so it overlaps the wait instead of following it."""

    short_ms: int = 200
    long_ms: int = 600
    guess_ms: int = 100  # Whisper starts on the utterance this early, so its transcript is (nearly) ready at short_ms

    @staticmethod
    def finished(text: str) -> bool:
        final = _FINAL.search(text.strip())  # the dangling word patterns end in \W*: the mark, quotes, space
        return final is not None and (_DANGLING_IN_QUESTION if final.group()[0] == "?" else _DANGLING).search(
            text) is None

    def wait_ms(self, text: str) -> int:
        """The quiet after speech that ends a turn whose transcript is `text`."""
        return self.short_ms if self.finished(text) else self.long_ms


@dataclass
class BargeIn:
    """Whether speech heard while the assistant is answering is the user taking the turn (a
    barge-in), and not a noise or the assistant's own voice coming back through the microphone:
    it must last `min_ms` (speech frames), its transcript must hold a word, and it must not be an
    echo. Where the caller knows what was played (parley.voice.echo.Playback), an echo is audio
    that is that sound coming back: its match with the played audio is `echo_audio` or more,
    whatever Whisper made of it. Where it does not, an echo is runs of the assistant's own recent
    words, in their order, that make up `echo_share` of the transcript or more (a one-word
    transcript that the answer holds counts); the words alone take a user who repeats the
    answer's words ("Remember that." over "I'll remember that ...") for its echo."""

    min_ms: int = 300
    echo_share: float = 0.6
    echo_audio: float = 0.3  # Playback.match: an echo measures 0.4+ with a roomful of reverberation, a voice 0.2-

    no_speech: float = 0.5  # Whisper's no-speech probability over this in every segment: a noise it put words to

    def verdict(self, heard: Transcription, said: str, played: float | None = None) -> str:
        """'' for a barge-in, else why not: "noise" (no words, or the segments say Whisper was not
        sure there was speech: it puts "you" to a burst of noise) or "echo": the sound that was
        played, by `played` (Playback.match), or where that is None the answer's own words.
        `heard` is judged whole: its text with its own segments (the text of one Whisper pass with
        the segments of another, on a longer or shorter cut, can read a noise as words)."""
        words, answer = normalize(heard.text), normalize(said)
        unsure = heard.segments and all(s.no_speech_prob > self.no_speech for s in heard.segments)
        if unsure or not any(any(c.isalpha() for c in w) for w in words):
            return "noise"
        if played is not None:  # the audio says whether it is the played sound; its words may be misheard
            return "echo" if played >= self.echo_audio else ""
        return "echo" if _echoed(words, answer) >= self.echo_share * len(words) else ""


def _echoed(words: list[str], said: list[str]) -> int:
    """How many of `words` lie in runs of two or more words that `said` holds in the same order (a
    misheard word between two runs breaks neither; single common words such as "the" do not count).
    A one-word transcript counts when `said` holds the word."""
    if len(words) == 1:
        return int(words[0] in said)
    from difflib import SequenceMatcher

    blocks = SequenceMatcher(None, words, said, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks if b.size >= 2)


@dataclass
class SileroVAD:
    """Silero VAD v6 through faster-whisper (which bundles the ONNX model); 16 kHz clips."""

    threshold: float = 0.5
    min_silence_ms: int = 500
    pad_ms: int = 100

    def segments(self, clip: Clip) -> list[tuple[float, float]]:
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        if clip.rate != 16_000:
            raise ValueError(f"Silero VAD takes 16 kHz audio, not {clip.rate} Hz")
        options = VadOptions(threshold=self.threshold, min_silence_duration_ms=self.min_silence_ms,
                             speech_pad_ms=self.pad_ms)
        return [(s["start"] / clip.rate, s["end"] / clip.rate)
                for s in get_speech_timestamps(clip.samples, options)]
