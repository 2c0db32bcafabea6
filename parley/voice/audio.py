"""Audio in and out: read a WAV (or compressed) file's bytes into a checked mono clip at the rate
a model wants, and write a clip back as 16-bit PCM WAV.

    clip = load_audio(open("hello.wav", "rb").read())       # mono float32, 16 kHz, checked
    clip = load_audio(read_file("hello.wav"))                 # the same, the file mapped, not read
    clip.samples, clip.rate, clip.seconds
    wav_bytes(clip)                                           # 16-bit PCM WAV bytes

Every way a file can be wrong (empty, not audio, truncated header, an encoding we do not read,
a rate out of range, silent, too long) is one `AudioError` that names what is wrong and what to
send instead: the CLI prints it, the server answers it as HTTP 400. WAV is parsed here (RIFF
chunks, with numpy) rather than by the stdlib `wave`, which reads integer PCM only: float WAVs
(what numpy/soundfile users write) and WAVE_FORMAT_EXTENSIBLE files (what many recorders write)
are read too. A stream writer's WAV, whose sizes say 0 or 0xFFFFFFFF, is read up to its end. Compressed
files (MP3, Ogg/Opus, FLAC, WebM, M4A: what browsers record and OpenAI's API takes) are decoded
by PyAV's FFmpeg when it is installed, only for those container formats.
"""

from __future__ import annotations

import importlib.util
import io
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parley.files import NotRegularFile, open_regular

MODEL_RATE = 16_000  # what the speech recognisers take
MIN_RATE, MAX_RATE = 8_000, 192_000
SILENCE = 1e-3  # peak below -60 dBFS: nothing a recogniser can hear

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE
_SEND = "send a WAV file (16-bit PCM, mono, 16 kHz is best)"


class AudioError(ValueError):
    """Audio we cannot use; `code` names the kind (empty, not_audio, unsupported, silent, too_long)."""

    def __init__(self, message: str, code: str = "invalid_audio"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Clip:
    """Mono audio: float32 samples in [-1, 1] at `rate` Hz."""

    samples: np.ndarray
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


def read_file(path) -> bytes | mmap.mmap:
    """An audio file's bytes, mapped rather than read: a WAV's samples are then read only once its
    header says they are within the length limit, a compressed file's only as far as it decodes."""
    path = Path(path)
    try:
        f = open_regular(path)  # a FIFO would block the read, a device never end
    except FileNotFoundError:
        raise FileNotFoundError(f"no audio file {path}") from None
    except NotRegularFile:
        raise AudioError(f"{path} is not a regular file (a folder, pipe or device): give an audio file", "not_audio") from None
    with f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""


def read_wav(data: bytes | mmap.mmap, max_seconds: float | None = None) -> Clip:
    """A WAV file's bytes as a mono clip at the file's own rate (channels averaged); longer than
    `max_seconds` is refused before its samples are read."""
    data = memoryview(data)  # slices share the bytes: the data chunk is not copied
    if not data:
        raise AudioError(f"the audio is empty (0 bytes): {_SEND}", "empty")
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        if len(data) < 12 and b"RIFF".startswith(data[:4]):
            raise AudioError(f"the WAV header is truncated: {len(data)} bytes, a header has at least 44", "not_audio")
        raise AudioError(f"the audio is not a WAV file (it starts with {bytes(data[:12])!r}): {_SEND}", "not_audio")
    fmt, pcm, at = None, None, 12
    while at + 8 <= len(data):
        tag, size = data[at:at + 4], struct.unpack_from("<I", data, at + 4)[0]
        body = data[at + 8:at + 8 + size]
        if tag == b"fmt ":
            if len(body) < 16:
                raise AudioError(f"the WAV header is truncated: its fmt chunk has {len(body)} of 16 bytes", "not_audio")
            fmt = body
        elif tag == b"data":
            if fmt is None:
                raise AudioError("the WAV file has its data before its fmt chunk: it is damaged", "not_audio")
            pcm = body  # a size past the end (a stream writer's 0xFFFFFFFF): read what there is
            break
        at += 8 + size + (size & 1)  # chunks are padded to an even length
    if fmt is None:
        raise AudioError(f"the WAV header is truncated: no fmt chunk in {len(data)} bytes", "not_audio")
    if pcm is None:
        raise AudioError("the WAV file has no data chunk (a truncated file?)", "not_audio")
    code, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", fmt)
    if code == _EXTENSIBLE and len(fmt) < 26:
        raise AudioError(f"the WAV's fmt chunk says WAVE_FORMAT_EXTENSIBLE but has {len(fmt)} bytes, too few to name "
                         "its sample format (40): the file is damaged", "not_audio")
    if code == _EXTENSIBLE:
        code = struct.unpack_from("<H", fmt, 24)[0]  # the first two bytes of the sub-format GUID
    width = bits // 8
    if not 1 <= channels <= 16 or bits % 8 or width == 0 or align != channels * width:
        raise AudioError(f"the WAV header is inconsistent ({channels} channels, {bits} bits, block {align} bytes)",
                         "not_audio")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"sample rate {rate} Hz is not supported: use {MIN_RATE}..{MAX_RATE} Hz (16000 is best)",
                         "unsupported")
    if max_seconds is not None and len(pcm) // align > max_seconds * rate:
        raise _too_long(len(pcm) // align / rate, max_seconds)
    samples = _decode(pcm[:len(pcm) - len(pcm) % align], code, width)
    return Clip(samples.reshape(-1, channels).mean(axis=1, dtype=np.float32), rate)


def _decode(raw: bytes, code: int, width: int) -> np.ndarray:
    if code == _PCM and width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    if code == _PCM and width in (2, 4):
        return np.frombuffer(raw, f"<i{width}").astype(np.float32) / 2 ** (8 * width - 1)
    if code == _PCM and width == 3:  # 24-bit: put each sample in the top three bytes of an int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        padded = np.zeros((len(b), 4), np.uint8)
        padded[:, 1:] = b
        return padded.view("<i4").ravel().astype(np.float32) / 2 ** 31
    if code == _FLOAT and width in (4, 8):
        samples = np.frombuffer(raw, f"<f{width}")
        if not np.isfinite(samples).all():
            raise AudioError("the WAV file holds NaN or infinite samples", "not_audio")
        return np.clip(samples, -1, 1).astype(np.float32)  # clipped first: a loud 64-bit sample is no float32 inf
    kind = {_PCM: "integer PCM", _FLOAT: "float"}.get(code, f"format code {code:#x} (compressed?)")
    raise AudioError(f"WAV {kind} with {8 * width}-bit samples is not supported: use 8/16/24/32-bit PCM "
                     "or 32/64-bit float", "unsupported")


def resample(samples: np.ndarray, rate: int, to: int) -> np.ndarray:
    """Band-limited resampling (in the frequency domain: exact for a clip, no filter design)."""
    if rate == to or len(samples) == 0:
        return samples.astype(np.float32, copy=False)
    n = max(1, round(len(samples) * to / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(len(spectrum), n // 2 + 1)
    out = np.zeros(n // 2 + 1, np.complex128)
    out[:keep] = spectrum[:keep]
    return (np.fft.irfft(out, n) * (n / len(samples))).astype(np.float32)


def check(clip: Clip, max_seconds: float = 600.0, min_seconds: float = 0.1) -> Clip:
    """The clip if a recogniser can use it, else an AudioError saying why."""
    if len(clip.samples) == 0:
        raise AudioError(f"the audio has no samples: {_SEND}", "empty")
    if clip.seconds < min_seconds:
        raise AudioError(f"the audio is {clip.seconds * 1000:.0f} ms long; send at least {min_seconds * 1000:.0f} ms",
                         "empty")
    if clip.seconds > max_seconds:
        raise _too_long(clip.seconds, max_seconds)
    if float(np.abs(clip.samples).max()) < SILENCE:
        raise AudioError("the audio is silent (peak below -60 dBFS): check the microphone or the file", "silent")
    return clip


def _too_long(seconds: float, max_seconds: float) -> AudioError:
    return AudioError(f"the audio is {seconds:.0f} s long, over the {max_seconds:.0f} s limit: split it into shorter "
                      "files", "too_long")


def load_audio(data: bytes | mmap.mmap, rate: int = MODEL_RATE, max_seconds: float = 600.0) -> Clip:
    """Audio bytes as a checked mono clip at `rate` Hz: WAV, or (with PyAV, which faster-whisper
    installs) MP3, Ogg/Opus, FLAC, WebM, M4A; `data` may be a file from `read_file`. A WAV's length
    is checked from its header before its samples are read, a compressed file's while it decodes,
    so a long file costs little work."""
    if data[:4] == b"RIFF" or len(data) < 12 or importlib.util.find_spec("av") is None:
        clip = check(read_wav(data, max_seconds), max_seconds)
        return Clip(resample(clip.samples, clip.rate, rate), rate)
    return check(decode(data, rate, max_seconds), max_seconds)


def container(head: bytes) -> str | None:
    """The FFmpeg demuxer for a compressed file, from its first bytes (None: none we decode). FFmpeg
    is given this one only: left to probe, it would try every format it knows on untrusted bytes
    (playlists, concat lists, images) before the one it found could be refused."""
    head = bytes(head[:12])
    if head[4:8] == b"ftyp":
        return "mp4"
    for magic, name in ((b"ID3", "mp3"), (b"OggS", "ogg"), (b"fLaC", "flac"), (b"\x1a\x45\xdf\xa3", "matroska")):
        if head.startswith(magic):
            return name
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # a frame's sync word
        return "aac" if head[1] & 0x06 == 0 else "mp3"  # layer bits 00: ADTS AAC; else an MPEG audio layer
    return None


def decode(data: bytes | mmap.mmap, rate: int, max_seconds: float) -> Clip:
    """A compressed file's audio (MP3, Ogg, FLAC, WebM/Matroska, MP4/M4A, ADTS AAC: `container`) as mono
    at `rate` Hz, through PyAV (FFmpeg)."""
    import av

    demuxer = container(data[:12])
    if demuxer is None:
        raise AudioError(f"the audio is not a WAV file or a format we decode (it starts with {bytes(data[:12])!r}): "
                         f"{_SEND}, or MP3, Ogg, FLAC, WebM, M4A", "not_audio")
    try:
        source = data if isinstance(data, mmap.mmap) else io.BytesIO(data)  # a mapped file: read as it decodes
        with av.open(source, format=demuxer, metadata_errors="ignore") as opened:
            stream = next((s for s in opened.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioError("the file has no audio stream", "not_audio")
            resampler, chunks, total = av.AudioResampler(format="flt", layout="mono", rate=rate), [], 0
            for frame in opened.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += len(chunks[-1])
                if total > max_seconds * rate:
                    raise AudioError(f"the audio is over the {max_seconds:.0f} s limit: split it into shorter files",
                                     "too_long")
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except av.FFmpegError as e:
        raise AudioError(f"the audio is not a WAV file and could not be decoded ({e.strerror or e}): {_SEND}, "
                         "or MP3, Ogg, FLAC, WebM, M4A", "not_audio") from None
    return Clip(np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32), rate)


def wav_bytes(clip: Clip) -> bytes:
    """The clip as a 16-bit PCM mono WAV file."""
    pcm = (np.clip(clip.samples, -1, 1) * 32767).round().astype("<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, _PCM, 1,
                         clip.rate, clip.rate * 2, 2, 16, b"data", len(pcm))
    return header + pcm
