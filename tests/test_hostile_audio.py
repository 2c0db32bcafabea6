"""Audio from outside, damaged on purpose: WAV headers that lie (channels, rates, bit depths, chunk
sizes, sub-formats), samples no float32 holds, files declared hours long but sparse, and audio
paths that are pipes or devices. Each is one clear AudioError (the CLI prints it as one line, exit
status 2; the server answers it as a 400) before the samples are read where the header already
says they are too many."""

import os
import struct

import numpy as np
import pytest

from parley import cli
from parley.voice.audio import AudioError, load_audio, read_file, read_wav


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
    (wav(fmt_chunk(code=0xFFFE, extra=struct.pack("<H", 0)), PCM), "not_audio", "EXTENSIBLE but has 18 bytes"),
    (wav(fmt_chunk(code=3, bits=32), np.full(4_000, np.inf, "<f4").tobytes()), "not_audio", "infinite"),
    (b"RIFX" + wav(fmt_chunk(), PCM)[4:], "not_audio", "format we decode"),  # big-endian RIFF
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


def test_a_long_wav_is_refused_from_its_header_before_its_samples_are_read():
    """Its samples (NaN here) were decoded before its length was checked."""
    nan = np.full(2 * 8_000, np.nan, "<f4").tobytes()  # 2 s at 8 kHz
    with pytest.raises(AudioError, match="2 s long, over the 1 s limit") as e:
        load_audio(wav(fmt_chunk(code=3, rate=8_000, bits=32), nan), max_seconds=1)
    assert e.value.code == "too_long"


def sparse_wav(path, seconds: float) -> None:
    """A float WAV `seconds` long at 8 kHz, NaN at its start, the rest a hole in the file (no disk)."""
    size = int(seconds * 8_000) * 4
    path.write_bytes(wav(fmt_chunk(code=3, rate=8_000, bits=32), np.full(8, np.nan, "<f4").tobytes(), size=size))
    os.truncate(path, len(wav(fmt_chunk())) + size)


@pytest.mark.parametrize("seconds", [601, 10 * 3600])
def test_parley_transcribe_refuses_a_long_file_without_reading_it(seconds, tmp_path, capsys):
    """The file was read whole into memory (and decoded) before its length was checked: 10 hours
    declared in a sparse file were gigabytes."""
    sparse_wav(path := tmp_path / "long.wav", seconds)
    assert cli.main(["transcribe", str(path)]) == 2
    assert f"{seconds} s long, over the 600 s limit" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_audio_paths_that_are_no_regular_files(kind, tmp_path, capsys):
    """A pipe or a device was called 'no audio file', as though it were missing."""
    path = tmp_path / "in.wav"
    {"fifo": os.mkfifo, "device": lambda p: os.symlink("/dev/zero", p), "folder": os.mkdir}[kind](path)
    assert cli.main(["transcribe", str(path)]) == 2
    assert "is not a regular file (a folder, pipe or device)" in capsys.readouterr().err
    assert cli.main(["transcribe", str(tmp_path / "missing.wav")]) == 2
    assert "no audio file" in capsys.readouterr().err


def test_a_mapped_file_reads_as_its_bytes(tmp_path):
    """read_file maps the file: a WAV and a compressed file read from it as from their bytes."""
    av = pytest.importorskip("av")
    import io

    (path := tmp_path / "a.wav").write_bytes(wav(fmt_chunk(), PCM))
    assert np.array_equal(load_audio(read_file(path)).samples, load_audio(path.read_bytes()).samples)
    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=16_000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(TONE[None], format="flt", layout="mono")
        frame.sample_rate = 16_000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    (path := tmp_path / "a.flac").write_bytes(out.getvalue())
    assert np.array_equal(load_audio(read_file(path)).samples, load_audio(out.getvalue()).samples)
    assert read_file(tmp_path / "a.flac")[:4] == b"fLaC"
    (empty := tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        load_audio(read_file(empty))
