"""`parley speak` and `parley transcribe`: speech synthesis and recognition from the command line.

    parley speak "Hello there. How are you?" --out hello.wav            # piper's joe voice
    parley speak "Hello" --out hello.wav --voice espeak:en-gb --speed 1.2
    parley transcribe hello.wav                                          # prints the text
    parley transcribe hello.wav --model runs/asr/model --dtype float32 --segments
    parley chat --audio-in question.wav --audio-out answer.wav      # one spoken turn (voice_chat)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from parley.config import parse_cli, setting
from parley.files import atomic_open


@dataclass
class SpeakConfig:
    text: str = setting(help="the text to speak ('-' reads it from stdin)", positional="TEXT")
    out: str = setting(help="the WAV file to write (16-bit PCM, mono)")
    voice: str = setting("default", "default (piper joe, else espeak-ng), joe, espeak, espeak:VOICE, or a piper "
                                    ".onnx file")
    speed: float = setting(1.0, "speaking rate, 0.25..4.0")


@dataclass
class TranscribeConfig:
    file: str = setting(help="a WAV file", positional="FILE")
    model: str = setting("default", "default (whisper tiny.en), a CTranslate2 Whisper folder, or a Wav2Vec2ForCTC "
                                    "folder")
    dtype: str = setting("", "compute type: '' = the backend's default (whisper int8, wav2vec 2.0 float32); "
                             "float32 is the one that equals transformers for wav2vec 2.0")
    segments: bool = setting(False, "print each segment with its start and end time")


def speak_main(argv: list[str], prog: str = "parley speak") -> int:
    import numpy as np

    from parley.voice.audio import Clip, wav_bytes
    from parley.voice.tts import load_tts, speak_stream

    cfg = parse_cli(SpeakConfig, argv, prog=prog)
    text = sys.stdin.read() if cfg.text == "-" else cfg.text
    tts = load_tts(cfg.voice, cfg.speed)
    clips = [clip for _, clip in speak_stream(tts, [text])]
    if not clips:
        raise ValueError("there is no text to speak: give some words")
    pause = np.zeros(int(0.15 * clips[0].rate), np.float32)  # a breath between sentences
    samples = np.concatenate([x for c in clips for x in (c.samples, pause)][:-1])
    clip = Clip(samples, clips[0].rate)
    with atomic_open(cfg.out, "wb") as f:
        f.write(wav_bytes(clip))
    print(f"wrote {cfg.out}: {clip.seconds:.1f} s of speech, voice {tts.name}")
    return 0


def transcribe_main(argv: list[str], prog: str = "parley transcribe") -> int:
    from parley.voice.asr import load_asr
    from parley.voice.audio import load_audio, read_file

    cfg = parse_cli(TranscribeConfig, argv, prog=prog)
    clip = load_audio(read_file(cfg.file))
    result = load_asr(cfg.model, cfg.dtype).transcribe(clip)
    if cfg.segments:
        for s in result.segments:
            print(f"[{s.start:7.2f} -> {s.end:7.2f}] {s.text}")
    else:
        print(result.text)
    return 0


def voice_chat(session, audio_in: str, audio_out: str = "", voice: str = "default", model: str = "default",
               stdout: TextIO = sys.stdout) -> int:
    """One spoken turn of `parley chat`: the WAV `audio_in` transcribed, said to the session (local
    or a server's), the answer printed as it streams and spoken sentence by sentence into
    `audio_out`. The transcript is what the conversation saves as the user's message."""
    import numpy as np

    from parley.pipeline.frames import ShownText
    from parley.voice.asr import load_asr
    from parley.voice.audio import Clip, load_audio, read_file, wav_bytes
    from parley.voice.tts import load_tts, speak_stream

    audio = read_file(audio_in)
    tts = load_tts(voice) if audio_out else None  # a bad voice fails before the turn, not after it
    heard = load_asr(model).transcribe(load_audio(audio)).text
    if not heard:
        raise ValueError(f"no speech was recognised in {audio_in}")
    print(f"you (heard)> {heard}", file=stdout)
    stdout.write("assistant> ")
    shown = ShownText()

    def pieces():
        for frame in session.say(heard):
            piece = shown(frame)
            stdout.write(piece)
            stdout.flush()
            yield piece

    if tts is None:
        for _ in pieces():
            pass
        print(file=stdout)
        return 0
    clips = [clip for _, clip in speak_stream(tts, pieces(), first_clause=4)]
    print(file=stdout)
    samples = np.concatenate([c.samples for c in clips]) if clips else np.zeros(0, np.float32)
    with atomic_open(audio_out, "wb") as f:
        f.write(wav_bytes(Clip(samples, tts.rate)))
    print(f"wrote {audio_out}: {len(samples) / tts.rate:.1f} s of speech, voice {tts.name}", file=stdout)
    return 0
