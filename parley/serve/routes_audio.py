"""OpenAI-compatible audio routes: /v1/audio/transcriptions and /v1/audio/speech.

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)
    client.audio.transcriptions.create(model="whisper-1", file=open("q.wav", "rb"))      # .text
    client.audio.transcriptions.create(model="whisper-1", file=..., response_format="verbose_json")
    client.audio.speech.create(model="tts-1", voice="alloy", input="Hello.", response_format="wav")

OpenAI's model names are aliases of ours: whisper-1 is Whisper tiny.en (faster-whisper); tts-1,
tts-1-hd and gpt-4o-mini-tts are the default voice (piper's joe, else espeak-ng), and OpenAI's
voice names (alloy, echo, ...) all mean that voice; `espeak` (model) or `espeak:VOICE` (voice)
picks espeak-ng. Speech streams sentence by sentence: a WAV header whose sizes say "unknown"
(as a live stream's), then each sentence's samples as soon as it is synthesized, so the first
audio leaves before the last sentence is made. Bad audio is a 400 that says what is wrong; a
body over the upload limit is a 413 from the middleware before it is read.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import struct
import threading
from collections.abc import Iterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from parley.serve.errors import APIError
from parley.serve.server import Server
from parley.store import User

WHISPER = "whisper-tiny.en"
TRANSCRIPTION_MODELS = ("whisper-1", WHISPER)
SPEECH_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "piper", "espeak")
MAX_SECONDS = 600.0  # of audio in one transcription
PCM_RATE = 24_000  # OpenAI's raw `pcm` format: 16-bit mono at 24 kHz


def audio_models() -> list[str]:
    """The speech model names /v1/models lists: those whose backend is installed."""
    names = list(TRANSCRIPTION_MODELS) if importlib.util.find_spec("faster_whisper") else []
    espeak = ["espeak"] if shutil.which("espeak-ng") else []
    return names + (list(SPEECH_MODELS[:-1]) if importlib.util.find_spec("piper") else []) + espeak


class SpeechRequest(BaseModel):
    model: str
    input: str = Field(max_length=4096)
    voice: str = "alloy"
    response_format: str = "wav"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None  # OpenAI's style prompt: our voices have no styles, so it is ignored


class Voices:
    """The server's speech models, each loaded on first use and kept (a few: the voice names a
    request may give are checked first, and no file path is one); one request at a time per
    model, so two cores are not split between several syntheses that all finish late."""

    def __init__(self):
        self._lock, self._models, self._busy = threading.Lock(), {}, {}

    def get(self, key: tuple, make):
        """The model made by `make` under `key` (made on first use) and its lock."""
        with self._lock:
            if key not in self._models:
                self._models[key], self._busy[key] = self.make(make), threading.Lock()
            return self._models[key], self._busy[key]

    def close(self) -> None:
        """Let go of the models once no route uses them: CTranslate2 (Whisper) joins its threads
        as its model is freed, which must happen before the interpreter exits; freed at exit
        instead, its threads abort the process ("terminate called without an active exception")."""
        with self._lock:
            self._models.clear()
            self._busy.clear()

    @staticmethod
    def make(make):
        """`make()`, its failures as API errors."""
        try:
            return make()
        except ImportError as e:
            raise APIError(503, f"speech is not installed on this server ({e.name} is missing): "
                           "pip install 'parley[voice]'", code="unavailable") from None
        except ValueError as e:  # TTSError / ASRError: a voice name that is not one
            raise APIError(400, str(e), code="invalid_value", param="voice") from None


def audio_routes(server: Server, voices: Voices) -> APIRouter:
    router = APIRouter(prefix="/v1/audio")
    auth = Depends(server.authenticate)

    @router.post("/transcriptions", openapi_extra=_form_schema())
    async def transcriptions(request: Request, user: User = auth):
        form = await request.form(max_files=1, max_fields=12)
        file, model = form.get("file"), form.get("model")
        fmt = form.get("response_format") or "json"
        if not isinstance(file, UploadFile):
            raise APIError(400, "send a multipart form with the audio in a 'file' field", code="invalid_value",
                           param="file")
        if not isinstance(model, str) or not model:
            raise APIError(400, f"the form needs a 'model' field: one of {', '.join(TRANSCRIPTION_MODELS)}",
                           code="invalid_value", param="model")
        if model not in TRANSCRIPTION_MODELS:
            raise APIError(404, f"no transcription model {model!r}: use one of {', '.join(TRANSCRIPTION_MODELS)}",
                           code="model_not_found", param="model")
        if fmt not in ("json", "text", "verbose_json", "srt", "vtt"):
            raise APIError(400, f"response_format {fmt!r} is not supported: use json, text, verbose_json, srt or vtt",
                           code="invalid_value", param="response_format")
        language = form.get("language") or "en"
        if not isinstance(language, str) or language.lower() not in ("en", "english"):
            raise APIError(400, f"language {language!r}: the speech models here are English-only (Whisper tiny.en); "
                           "send English speech with language=en or none", code="invalid_value", param="language")
        data = await file.read()
        result = await run_in_threadpool(_transcribe, voices, data)
        if fmt == "json":
            return {"text": result.text}
        if fmt == "verbose_json":
            return {"task": "transcribe", "language": "english", "duration": round(result.seconds, 3),
                    "text": result.text, "segments": [_segment(i, s) for i, s in enumerate(result.segments)]}
        return PlainTextResponse(_subtitles(result.segments, fmt) if fmt in ("srt", "vtt") else result.text)

    @router.post("/speech", response_class=StreamingResponse,
                 responses={200: {"content": {"audio/wav": {}, "audio/pcm": {}}}})
    def speech(req: SpeechRequest, user: User = auth):
        from parley.voice.audio import resample
        from parley.voice.tts import OPENAI_VOICES, TTSError, load_tts, sentences

        if req.model not in SPEECH_MODELS:
            raise APIError(404, f"no speech model {req.model!r}: use one of {', '.join(SPEECH_MODELS)}",
                           code="model_not_found", param="model")
        if req.response_format not in ("wav", "pcm"):
            raise APIError(400, f"response_format {req.response_format!r} is not supported: use wav or pcm",
                           code="invalid_value", param="response_format")
        if not any(c.isalnum() for c in req.input):
            raise APIError(400, "input has nothing to speak: give some words", code="invalid_value", param="input")
        name = req.voice if req.voice not in OPENAI_VOICES else {"espeak": "espeak", "piper": "joe"}.get(
            req.model, "default")
        if name not in ("default", "joe", "espeak") and not re.fullmatch(r"espeak:[\w+-]+", name):
            raise APIError(400, f"no voice named {name!r}: use one of {', '.join(OPENAI_VOICES)}, default, joe, "
                           "espeak or espeak:VOICE (espeak-ng --voices=en)", code="invalid_value", param="voice")
        if name in ("default", "joe"):  # piper: loaded once, kept
            tts, busy = voices.get(("tts", name), lambda: load_tts(name))
        else:  # espeak-ng: nothing to load, a process per sentence
            tts, busy = voices.make(lambda: load_tts(name)), threading.Lock()
        rate = PCM_RATE if req.response_format == "pcm" else tts.rate
        parts = [s for s in sentences([req.input]) if any(c.isalnum() for c in s)]

        def pcm(sentence: str) -> bytes:
            with busy:
                clip = tts.synthesize(sentence, req.speed)
            return (resample(clip.samples, clip.rate, rate).clip(-1, 1) * 32767).round().astype("<i2").tobytes()

        try:  # the first sentence before the answer starts: a voice that fails is a 400, not an empty stream
            first = pcm(parts[0])
        except TTSError as e:
            raise APIError(400, str(e), code="invalid_value", param="voice") from None

        def stream() -> Iterator[bytes]:  # Starlette runs a plain iterator in its thread pool
            yield (_stream_header(rate) if req.response_format == "wav" else b"") + first
            for sentence in parts[1:]:
                try:
                    yield pcm(sentence)
                except TTSError:  # nothing to say in this piece after all: skip it, keep the stream
                    continue

        return StreamingResponse(stream(), media_type="audio/wav" if req.response_format == "wav" else "audio/pcm")

    return router


def _transcribe(voices: Voices, data: bytes):
    from parley.voice.asr import load_asr
    from parley.voice.audio import AudioError, load_audio

    try:
        clip = load_audio(data, max_seconds=MAX_SECONDS)
    except AudioError as e:
        raise APIError(400, str(e), code=e.code, param="file") from None
    asr, busy = voices.get(("asr", WHISPER), lambda: load_asr("default"))
    with busy:
        return asr.transcribe(clip)


def _stream_header(rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as live streams do)."""
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 0xFFFFFFFF, b"WAVE", b"fmt ", 16, 1, 1, rate, rate * 2, 2, 16,
                       b"data", 0xFFFFFFFF)


def _segment(i: int, s) -> dict:
    return {"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text, "tokens": [], "temperature": 0.0,
            "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob}


def _subtitles(segments, fmt: str) -> str:
    def stamp(t: float) -> str:
        ms = round(t * 1000)
        text = f"{ms // 3_600_000:02}:{ms // 60_000 % 60:02}:{ms // 1000 % 60:02}.{ms % 1000:03}"
        return text.replace(".", ",") if fmt == "srt" else text

    cues = [f"{stamp(s.start)} --> {stamp(s.end)}\n{s.text}\n" for s in segments]
    if fmt == "vtt":
        return "WEBVTT\n\n" + "\n".join(cues)
    return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(cues, 1))


def _form_schema() -> dict:
    """The multipart form, for /docs (the route reads the form itself to bound its size)."""
    fields = {"file": {"type": "string", "format": "binary"},
              "model": {"type": "string", "enum": list(TRANSCRIPTION_MODELS)},
              "response_format": {"type": "string", "enum": ["json", "text", "verbose_json", "srt", "vtt"]},
              "language": {"type": "string"}, "prompt": {"type": "string"}, "temperature": {"type": "number"}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file", "model"], "properties": fields}}}}}

