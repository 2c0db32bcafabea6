"""Audio from outside, damaged on purpose: WAV headers that lie (channels, rates, bit depths, chunk
sizes, sub-formats), samples no float32 holds, files declared hours long but sparse, and audio
paths that are pipes or devices. Each is one clear AudioError (the CLI prints it as one line, exit
status 2; the server answers it as a 400) before the samples are read where the header already
says they are too many."""

import struct

import numpy as np
import pytest

from parley.voice.audio import AudioError, load_audio, read_wav


def fmt_chunk(code=1, channels=1, rate=16_000, bits=16, align=None, extra=b"") -> bytes:
    align = channels * (bits // 8) if align is None else align
    return struct.pack("<HHIIHH", code, channels, rate, rate * align & 0xFFFFFFFF, align & 0xFFFF, bits) + extra


def wav(fmt: bytes = b"", data: bytes = b"", size: int | None = None) -> bytes:
    """A WAV file built by hand; `size` is what its data chunk says it holds (its length unless given)."""
    fmt = fmt or fmt_chunk()
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data) if size is None else size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


TONE = (0.5 * np.sin(np.arange(4_000) / 5)).astype(np.float32)
PCM = (TONE * 32767).astype("<i2").tobytes()


@pytest.mark.parametrize("data,code,words", [
    (wav(fmt_chunk(channels=0), PCM), "not_audio", "0 channels"),
    (wav(fmt_chunk(channels=65535), PCM), "not_audio", "65535 channels"),
    (wav(fmt_chunk(rate=0), PCM), "unsupported", "0 Hz"),
    (wav(fmt_chunk(rate=4_000_000_000), PCM), "unsupported", "4000000000 Hz"),
    (wav(fmt_chunk(bits=0, align=2), PCM), "not_audio", "0 bits"),
    (wav(fmt_chunk(bits=7, align=1), PCM), "not_audio", "7 bits"),
    (wav(fmt_chunk(), PCM)[:30], "not_audio", "fmt chunk has 10 of 16 bytes"),  # ends inside the fmt chunk
    (wav(fmt_chunk(code=0xFFFE, extra=struct.pack("<HHI", 22, 16, 4) + b"\x55\0" + bytes(14)), PCM),
     "unsupported", "0x55"),  # WAVE_FORMAT_EXTENSIBLE whose sub-format is MP3
    (wav(fmt_chunk(code=3, bits=32), np.full(4_000, np.inf, "<f4").tobytes()), "not_audio", "infinite"),
    (b"RIFX" + wav(fmt_chunk(), PCM)[4:], "not_audio", "could not be decoded"),  # big-endian RIFF
])
def test_lying_headers_are_one_clear_error(data, code, words):
    pytest.importorskip("av")  # the RIFX case goes to FFmpeg, which does not read it either
    with pytest.raises(AudioError, match=words) as e:
        load_audio(data)
    assert e.value.code == code


def test_sizes_that_lie_read_what_is_there():
    """A data size of 2^32-1, a RIFF size smaller than the file, an empty chunk before the data."""
    riff_small = wav(fmt_chunk(), PCM)
    riff_small = riff_small[:4] + struct.pack("<I", 4) + riff_small[8:]
    plain = wav(fmt_chunk(), PCM)
    empty_chunk = plain[:36] + b"LIST" + struct.pack("<I", 0) + plain[36:]  # after the fmt chunk: passed over
    for data in (wav(fmt_chunk(), PCM, size=2**32 - 1), riff_small, empty_chunk):
        assert np.allclose(read_wav(data).samples, TONE, atol=1e-4)


def test_loud_64_bit_float_samples_are_clipped_not_called_infinite():
    """A finite float64 sample past float32's range (1e300) was cast to inf first, then refused as
    'NaN or infinite'; float WAV samples past ±1 are clipped, as any other."""
    loud = np.concatenate([TONE, [1e300, -1e300]]).astype("<f8")
    clip = read_wav(wav(fmt_chunk(code=3, bits=64), loud.tobytes()))
    assert np.isfinite(clip.samples).all() and clip.samples.max() == 1 and clip.samples.min() == -1
