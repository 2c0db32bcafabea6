"""Voice stages on real audio made in the test: WAV checks, piper and espeak-ng synthesis,
Whisper tiny.en recognition of that speech, and the `parley speak` / `parley transcribe` commands."""

import shutil
import struct

import numpy as np
import pytest

from parley.cli import main
from parley.voice.asr import load_asr, normalize, wer
from parley.voice.audio import AudioError, Clip, load_audio, read_wav, resample, wav_bytes
from parley.voice.tts import TTSError, load_tts, sentences, speak_stream, spoken

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")

SENTENCE = "The weather is sunny and warm today."
WER_BOUND = 0.25  # piper's voice through tiny.en scores ~0.06 (RESOURCES.md); espeak's ~0.16


@pytest.fixture(scope="module")
def piper():
    return load_tts("default")


@pytest.fixture(scope="module")
def whisper():
    return load_asr("default")


def tone(seconds=0.5, rate=16_000, amp=0.5, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav(fmt=1, channels=1, rate=16_000, bits=16, data=b"\0\1" * 8000, extra=b""):
    """A WAV file built by hand, so each header field can be wrong on purpose."""
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk + extra)) + fmt_chunk + extra
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ---------------------------------------------------------------- audio checks

def test_wav_round_trip_and_resampling_keep_a_tone():
    clip = Clip(tone(rate=44_100), 44_100)
    back = load_audio(wav_bytes(clip))  # to 16 kHz
    assert back.rate == 16_000 and abs(back.seconds - 0.5) < 1e-3
    spectrum = np.abs(np.fft.rfft(back.samples))
    assert abs(np.argmax(spectrum) * 16_000 / len(back.samples) - 440) < 3  # still a 440 Hz tone
    assert np.abs(back.samples).max() == pytest.approx(0.5, abs=0.02)
    assert len(resample(tone(), 16_000, 8_000)) == 4_000


@pytest.mark.parametrize("fmt,bits,encode", [
    (1, 8, lambda x: ((x * 127) + 128).astype(np.uint8).tobytes()),
    (1, 16, lambda x: (x * 32767).astype("<i2").tobytes()),
    (1, 24, lambda x: b"".join(int(v).to_bytes(3, "little", signed=True) for v in (x * 8388607).astype(int))),
    (1, 32, lambda x: (x * 2147483647).astype("<i4").tobytes()),
    (3, 32, lambda x: x.astype("<f4").tobytes()),
    (3, 64, lambda x: x.astype("<f8").tobytes()),
])
def test_every_pcm_and_float_encoding_reads_the_same_samples(fmt, bits, encode):
    x = tone(0.2)
    clip = read_wav(wav(fmt=fmt, bits=bits, data=encode(x)))
    assert np.allclose(clip.samples, x, atol=2 / 128 if bits == 8 else 1e-4)


def test_stereo_is_averaged_and_extensible_and_stream_sizes_are_read():
    left, right = tone(0.2, amp=0.4), tone(0.2, amp=0.2)
    stereo = np.stack([left, right], 1).ravel()
    clip = read_wav(wav(channels=2, data=(stereo * 32767).astype("<i2").tobytes()))
    assert np.allclose(clip.samples, (left + right) / 2, atol=1e-4)
    # WAVE_FORMAT_EXTENSIBLE whose sub-format GUID starts with 1 (PCM)
    fmt_ext = struct.pack("<HHIIHH", 0xFFFE, 1, 16_000, 32_000, 2, 16) + struct.pack("<HHI", 22, 16, 4) \
        + struct.pack("<H", 1) + bytes(14)
    data = (tone(0.2) * 32767).astype("<i2").tobytes()
    ext = b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_ext)) + fmt_ext \
        + b"data" + struct.pack("<I", 0xFFFFFFFF) + data  # a stream writer's sizes
    assert np.allclose(read_wav(ext).samples, tone(0.2), atol=1e-4)


@pytest.mark.parametrize("data,code,words", [
    (b"", "empty", "empty"),
    (b"RIFF\x10\0", "not_audio", "truncated"),
    (b"%PDF-1.7 some document", "not_audio", "not a WAV"),
    (b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0", "not_audio", "truncated"),
    (b"RIFF\0\0\0\0WAVEdata\0\0\0\0", "not_audio", "data before its fmt"),
    (wav()[:36], "not_audio", "no data chunk"),
    (wav(rate=4_000), "unsupported", "4000 Hz"),
    (wav(rate=400_000), "unsupported", "400000 Hz"),
    (wav(fmt=2, bits=4 * 4), "unsupported", "compressed"),
    (wav(bits=12), "not_audio", "inconsistent"),
    (wav(data=b""), "empty", "no samples"),
    (wav(data=bytes(32_000)), "silent", "silent"),
    (wav(data=(tone(0.05) * 32767).astype("<i2").tobytes()), "empty", "at least"),
    (wav(fmt=3, bits=32, data=np.full(4000, np.nan, "<f4").tobytes()), "not_audio", "NaN"),
])
def test_bad_audio_is_one_clear_error(data, code, words):
    with pytest.raises(AudioError, match=words) as e:
        load_audio(data)
    assert e.value.code == code


def test_too_long_is_refused_before_resampling():
    with pytest.raises(AudioError, match="over the 1 s limit") as e:
        load_audio(wav_bytes(Clip(tone(2.0, rate=48_000), 48_000)), max_seconds=1)
    assert e.value.code == "too_long"


def encode(clip: Clip, fmt: str, codec: str) -> bytes:
    """The clip compressed by PyAV (FFmpeg), as a browser or a phone would send it."""
    import io

    import av

    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=48_000 if codec == "libopus" else clip.rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(clip.samples[None].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = clip.rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize("fmt,codec", [("mp3", "libmp3lame"), ("ogg", "libopus"), ("flac", "flac"),
                                       ("webm", "libopus"), ("ipod", "aac")])
def test_compressed_speech_is_decoded_and_recognised(fmt, codec, piper, whisper):
    pytest.importorskip("av")
    speech = load_audio(wav_bytes(piper.synthesize(SENTENCE)))
    clip = load_audio(encode(speech, fmt, codec))
    assert clip.rate == 16_000 and abs(clip.seconds - speech.seconds) < 0.15
    assert wer(SENTENCE, whisper.transcribe(clip).text) <= WER_BOUND


def test_compressed_files_are_bounded_and_checked():
    pytest.importorskip("av")
    long = encode(Clip(tone(3.0), 16_000), "mp3", "libmp3lame")
    with pytest.raises(AudioError, match="over the 1 s limit") as e:
        load_audio(long, max_seconds=1)
    assert e.value.code == "too_long"
    with pytest.raises(AudioError, match="silent"):
        load_audio(encode(Clip(np.zeros(16_000, np.float32), 16_000), "flac", "flac"))
    with pytest.raises(AudioError, match="could not be decoded") as e:
        load_audio(long[:200] + bytes(300))  # an MP3 cut short and zeroed
    gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00" \
        b"\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    with pytest.raises(AudioError, match=r"format we decode \(it starts with b'GIF89a") as e:
        load_audio(gif)  # FFmpeg reads images too: only audio containers reach it
    assert e.value.code == "not_audio"
    for playlist in (b"#EXTM3U\n#EXT-X-VERSION:3\nhttp://127.0.0.1:9/a.ts\n", b"ffconcat version 1.0\nfile /etc/passwd\n"):
        with pytest.raises(AudioError, match="format we decode") as e:  # never given to FFmpeg's probe
            load_audio(playlist)
        assert e.value.code == "not_audio"


# ---------------------------------------------------------------- synthesis

def test_sentences_come_out_as_soon_as_they_end():
    seen = []
    pieces = iter(["Hello the", "re. How are", " you? Pi is 3.", "14 today!\nNew", " line"])

    def feed():
        for p in pieces:
            seen.append(p)
            yield p

    out = []
    for sentence in sentences(feed()):
        out.append((sentence, len(seen)))
    assert out == [("Hello there.", 2), ("How are you?", 3), ("Pi is 3.14 today!", 4), ("New line", 5)]
    answer = ["Yes, ", "it is. Well, ", "in most countries, ", "the tap water is safe, mostly."]
    assert list(sentences(answer, first_clause=3)) == ["Yes, it is.", "Well, in most countries, the tap water is "
                                                       "safe, mostly."]
    assert list(sentences(["The tap water there, ", "in most towns, is safe."], first_clause=3)) == [
        "The tap water there,", "in most towns, is safe."]  # only the first piece is cut at a clause
    assert next(sentences(["Yes, the tap water, ", "is safe."], first_clause=3)) == "Yes, the tap water,"
    # a long first sentence: its first words are spoken first, if enough of it follows them
    answer = ["To kill all the child processes ", "of a script use kill. ", "Then wait for them."]
    assert list(sentences(answer, first_clause=4, first_words=6)) == [
        "To kill all the child processes", "of a script use kill.", "Then wait for them."]
    assert list(sentences(["To kill all the child processes of a script, use kill."], 4, 6)) == [
        "To kill all the child processes of a script,", "use kill."]  # a clause is a better place
    assert next(sentences([" To kill all the child processes, use kill."], 4, 6)) == \
        "To kill all the child processes,"  # one word after the 6th: no cut that leaves it alone
    long = list(sentences(["word, " * 100]))
    assert len(long) > 1 and all(len(s) <= 300 for s in long)


def test_piper_and_espeak_speak_and_bad_input_is_refused(piper):
    clip = piper.synthesize("Good morning.")
    assert piper.name == "joe" and clip.rate == 22_050 and 0.4 < clip.seconds < 3
    assert np.abs(clip.samples).max() > 0.1
    with pytest.raises(TTSError, match="no text"):
        piper.synthesize("  \n ")
    with pytest.raises(TTSError, match="over the 4096"):
        piper.synthesize("a " * 3000)
    with pytest.raises(TTSError, match="no voice named"):
        load_tts("nobody")
    with pytest.raises(TTSError, match="not a voice name"):
        load_tts("espeak:--help; rm")
    with pytest.raises(TTSError, match="speed"):
        load_tts("default", speed=9)
    assert load_tts("alloy").name == "joe"  # OpenAI's voice names mean the default voice


@needs_espeak
def test_espeak_voice_and_speed():
    slow, fast = load_tts("espeak:en-gb", 0.6), load_tts("espeak:en-gb", 1.8)
    text = "One two three four five six."
    assert slow.synthesize(text).seconds > 1.8 * fast.synthesize(text).seconds
    with pytest.raises(TTSError, match="espeak-ng failed"):
        load_tts("espeak:xx-nonexistent").synthesize("hello")


def test_speak_stream_yields_audio_per_sentence(piper):
    pieces = ["It is ", "late. ", "Good ", "night."]
    out = list(speak_stream(piper, pieces))
    assert [s for s, _ in out] == ["It is late.", "Good night."]
    assert all(c.seconds > 0.3 for _, c in out)


def test_the_marks_that_cite_sources_are_shown_but_not_spoken():
    assert spoken("Use a deque [1].") == "Use a deque."
    assert spoken("It joins paths [1, 3]!") == "It joins paths!"
    assert spoken("[2]") == "" and spoken(" [2].") == ""
    assert spoken("Index it as items[0] here.") == "Index it as items[0] here."  # code is not a citation


@needs_espeak
def test_a_cited_answer_sounds_as_the_same_answer_without_its_marks():
    espeak = load_tts("espeak:en-us")
    out = list(speak_stream(espeak, ["It is late [1]. ", "Good night [2, 3]."]))
    assert [s for s, _ in out] == ["It is late [1].", "Good night [2, 3]."]  # the text keeps them
    plain = [espeak.synthesize(s) for s in ("It is late.", "Good night.")]
    assert [c.samples.tobytes() for _, c in out] == [c.samples.tobytes() for c in plain]


# ---------------------------------------------------------------- recognition

def test_whisper_transcribes_piper_speech(piper, whisper):
    result = whisper.transcribe(load_audio(wav_bytes(piper.synthesize(SENTENCE))))
    assert wer(SENTENCE, result.text) <= WER_BOUND, result.text
    assert result.segments and result.segments[0].start == 0.0 and result.segments[-1].end <= result.seconds + 0.5


@needs_espeak
def test_whisper_with_a_window_fitted_to_the_clip_hears_the_same(piper, whisper):
    """The live route's Whisper reads a window a second longer than the utterance (10 s at
    least), not 30 s: its encoder is given that window's features, not 30 s of them (faster-whisper
    pads each window to 30 s; WhisperASR cuts them back)."""
    from parley.voice.asr import FIT_MIN_S, ASRError, WhisperASR, whisper_folder

    clip = piper.synthesize(SENTENCE)
    fitted = load_asr("default", window=0)
    assert fitted.window == 0 and wer(SENTENCE, fitted.transcribe(load_audio(wav_bytes(clip))).text) <= WER_BOUND
    padded = np.zeros((1, 80, 3000), np.float32)  # what faster-whisper hands the encoder: 30 s of features
    assert fitted.model.encode(padded).shape[1] == FIT_MIN_S * 50  # 2 features per encoder position
    assert whisper.model.encode(padded).shape[1] == 1500  # the 30 s window reads all of it
    with pytest.raises(ASRError, match="window"):
        WhisperASR(whisper_folder("default"), window=31)


@needs_espeak
def test_whisper_transcribes_espeak_speech(whisper):
    text = "Please open the window."
    result = whisper.transcribe(load_audio(wav_bytes(load_tts("espeak:en-us").synthesize(text))))
    assert wer(text, result.text) <= 0.5, result.text


def test_wer_and_normalize():
    assert normalize("Hello, World! It's 3 o'clock.") == ["hello", "world", "it's", "three", "o'clock"]
    assert wer("the cat sat", "the cat sat") == 0
    assert wer("the cat sat", "the cat sad") == pytest.approx(1 / 3)
    assert wer("a b", "") == 1 and wer("", "") == 0


# ---------------------------------------------------------------- commands

def test_speak_then_transcribe_commands(tmp_path, capsys):
    out = tmp_path / "hello.wav"
    assert main(["speak", SENTENCE + " See you soon.", "--out", str(out)]) == 0
    assert "voice joe" in capsys.readouterr().out
    assert main(["transcribe", str(out), "--segments"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("[") and wer(SENTENCE + " See you soon.", printed.split("] ", 1)[1]) <= WER_BOUND
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    assert main(["transcribe", str(tmp_path / "bad.wav")]) == 2
    assert "not a WAV file" in capsys.readouterr().err
    assert main(["transcribe", str(tmp_path / "missing.wav")]) == 2
    assert main(["speak", "hi", "--out", str(out), "--voice", "nobody"]) == 2
    assert "no voice named" in capsys.readouterr().err
