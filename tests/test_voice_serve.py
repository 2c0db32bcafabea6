"""The audio routes over real parts: uvicorn on a local port, the official openai SDK, piper's voice
and Whisper tiny.en; the round trip /v1/audio/speech -> /v1/audio/transcriptions gives the text back."""

import signal
import struct

import httpx
import numpy as np
import openai
import pytest

from parley.engine.config import EngineConfig
from parley.serve.app import create_app
from parley.serve.settings import Settings
from parley.voice.asr import wer
from parley.voice.audio import Clip, load_audio, read_wav, wav_bytes
from serving import serving
from test_serve import make_users
from test_voice import encode, needs_espeak

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")

TEXT = "Turn on the kitchen lights. Then play some quiet music."
WER_BOUND = 0.25  # tiny.en scores ~0.05 on piper speech (benchmarks/voice.py)
UPLOAD = 400_000  # bytes: 12 s of 16 kHz 16-bit audio


@pytest.fixture(scope="module", autouse=True)
def broken_pipes_raise():
    """A refused upload closes the socket while the client still sends: that must be an error in
    the client, not SIGPIPE killing the test process (the `parley` command sets SIGPIPE to the
    default so that `parley ... | head` ends quietly; a test run from a shell may inherit that)."""
    before = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGPIPE, before)


@pytest.fixture(scope="module")
def site(tiny768_registry, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("db") / "parley.db")
    keys = make_users(db, ann="user")
    settings = Settings(db=db, home=tiny768_registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        max_upload_bytes=UPLOAD)
    with serving(create_app(settings)) as url:
        yield url, openai.OpenAI(base_url=url + "/v1", api_key=keys["ann"], max_retries=0), keys["ann"]


@pytest.fixture(scope="module")
def spoken(site):
    """TEXT as WAV bytes from /v1/audio/speech, with OpenAI's names for model and voice."""
    return site[1].audio.speech.create(model="tts-1", voice="alloy", input=TEXT, response_format="wav").content


@needs_espeak
def test_models_lists_the_speech_models(site):
    names = [m.id for m in site[1].models.list()]
    assert {"whisper-1", "whisper-tiny.en", "tts-1", "espeak"} <= set(names)
    assert site[1].models.retrieve("whisper-1").id == "whisper-1"


def test_speech_then_transcription_gives_the_text_back(site, spoken):
    clip = read_wav(spoken)
    assert clip.rate == 22_050 and 2.5 < clip.seconds < 8
    sdk = site[1]
    text = sdk.audio.transcriptions.create(model="whisper-1", file=("speech.wav", spoken), language="en").text
    assert wer(TEXT, text) <= WER_BOUND, text
    verbose = sdk.audio.transcriptions.create(model="whisper-1", file=("speech.wav", spoken),
                                              response_format="verbose_json")
    assert verbose.text == text and verbose.duration == pytest.approx(clip.seconds, abs=0.01)
    assert verbose.segments and verbose.segments[0].start == 0 and verbose.segments[-1].end <= clip.seconds + 0.5
    assert " ".join(s.text for s in verbose.segments) == text
    plain = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("speech.wav", spoken),
                                            response_format="text")
    assert plain.strip() == text
    srt = sdk.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0")
    webm = encode(load_audio(spoken), "webm", "libopus")  # what a browser's MediaRecorder sends
    assert wer(TEXT, sdk.audio.transcriptions.create(model="whisper-1", file=("speech.webm", webm)).text) <= WER_BOUND


@needs_espeak
def test_speech_streams_sentence_by_sentence_and_as_pcm(site):
    sdk = site[1]
    with sdk.audio.speech.with_streaming_response.create(model="tts-1", voice="echo", input=TEXT,
                                                         response_format="wav") as response:
        chunks = list(response.iter_bytes(chunk_size=None))
    assert response.headers["content-type"] == "audio/wav"
    header = b"".join(chunks)[:44]
    assert struct.unpack_from("<I", header, 40)[0] == 0xFFFFFFFF  # a stream: the length is not known ahead
    pcm = sdk.audio.speech.create(model="espeak", voice="alloy", input="Hello there.", response_format="pcm").content
    assert len(pcm) % 2 == 0 and 0.5 < len(pcm) / 2 / 24_000 < 3  # OpenAI's pcm: 16-bit at 24 kHz
    gb = sdk.audio.speech.create(model="tts-1", voice="espeak:en-gb", input="Hello there.", speed=1.5).content
    assert read_wav(gb).seconds < 2


def silent_wav() -> bytes:
    return wav_bytes(Clip(np.zeros(16_000, np.float32), 16_000))


@pytest.mark.parametrize("name,data,code", [
    ("empty.wav", b"", "empty"),
    ("notes.txt", b"these are not sounds", "not_audio"),
    ("cut.wav", b"RIFF\x24\x00", "not_audio"),
    ("quiet.wav", None, "silent"),
    ("short.wav", b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0\x01\0\x40\x1f\0\0\x80\x3e\0\0\x02\0\x10\0"
     b"data\x04\0\0\0\0\0\0\0", "empty"),
    ("rate.wav", b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0\x01\0\xa0\x0f\0\0\x40\x1f\0\0\x02\0\x10\0"
     b"data\x04\0\0\0\0\0\0\0", "unsupported"),
])
def test_bad_audio_is_a_400_that_says_why(site, name, data, code):
    with pytest.raises(openai.BadRequestError) as e:
        site[1].audio.transcriptions.create(model="whisper-1", file=(name, silent_wav() if data is None else data))
    assert e.value.status_code == 400 and e.value.code == code and e.value.param == "file"


@needs_espeak
def test_requests_are_checked_and_bounded(site):
    url, sdk, key = site
    with pytest.raises(openai.NotFoundError, match="no transcription model"):
        sdk.audio.transcriptions.create(model="whisper-9", file=("a.wav", silent_wav()))
    # a form without its model field is the client's mistake (400), not a model that does not exist (404)
    reply = httpx.post(url + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {key}"},
                       files={"file": ("a.wav", silent_wav(), "audio/wav")})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "model", reply.text
    with pytest.raises(openai.NotFoundError, match="no speech model"):
        sdk.audio.speech.create(model="tts-9", voice="alloy", input="hi")
    with pytest.raises(openai.BadRequestError, match="use wav or pcm"):
        sdk.audio.speech.create(model="tts-1", voice="alloy", input="hi", response_format="mp3")
    with pytest.raises(openai.BadRequestError, match="nothing to speak"):
        sdk.audio.speech.create(model="tts-1", voice="alloy", input=" ... ")
    for voice in ("nobody", "/etc/passwd.onnx", "espeak:en;rm"):  # no file path: only our voices' names
        with pytest.raises(openai.BadRequestError, match="no voice named"):
            sdk.audio.speech.create(model="tts-1", voice=voice, input="hi")
    with pytest.raises(openai.BadRequestError, match="espeak-ng failed"):  # before the stream starts
        sdk.audio.speech.create(model="tts-1", voice="espeak:xx-nonexistent", input="hi")
    with pytest.raises(openai.BadRequestError, match="speed"):
        sdk.audio.speech.create(model="tts-1", voice="alloy", input="hi", speed=9)
    with pytest.raises(openai.BadRequestError, match="English-only"):
        sdk.audio.transcriptions.create(model="whisper-1", file=("a.wav", silent_wav()), language="fr")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        sdk.audio.transcriptions.create(model="whisper-1", file=("a.wav", silent_wav()), response_format="xml")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).audio.transcriptions.create(
            model="whisper-1", file=("a.wav", silent_wav()))
    big = wav_bytes(Clip(np.full(UPLOAD, 0.1, np.float32), 16_000))  # 2 bytes a sample: twice the limit
    with pytest.raises(openai.APIStatusError) as e:
        sdk.audio.transcriptions.create(model="whisper-1", file=("big.wav", big))
    assert e.value.status_code == 413
    # chunked, without a Content-Length: the middleware counts the multipart body as it arrives
    form = httpx.Client(timeout=60).build_request("POST", url + "/v1/audio/transcriptions",
                                                  files={"file": ("big.wav", big)}, data={"model": "whisper-1"})
    body = form.read()
    chunked = httpx.post(url + "/v1/audio/transcriptions", headers={
        "Authorization": f"Bearer {key}", "Content-Type": form.headers["content-type"]},
        content=(body[i:i + 65536] for i in range(0, len(body), 65536)), timeout=60)
    assert chunked.status_code == 413
    no_file = httpx.post(url + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {key}"},
                         data={"model": "whisper-1"}, timeout=60)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"

