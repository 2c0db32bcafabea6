"""What the assistant played, on the microphone's clock, and how much of what the microphone
heard is that sound coming back (an echo), judged on the audio itself rather than its words.

    played = Playback()
    played.add(start_s=12.4, clip=answer_clip)         # played from 12.4 s of the microphone stream
    played.match(heard_samples, start_s=13.1)          # 0..1: 0.4+ an echo, < 0.2 another voice

An echo is the played waveform again, delayed (the client's output and input buffers, the air),
scaled and coloured by the room: its normalized cross-correlation with the played audio at the
right delay stays high (0.4 and more with as much reverberation as direct sound, 5 dB of noise
over it). A user saying the same words, even in the same synthetic voice, matches no delay of it
(0.2 at most): different timing and phase. So a user repeating the answer's words while it
plays is not taken for its echo, and speech heard while nothing played cannot be one.
tests/test_voice_echo.py measures both on synthesized speech.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from parley.voice.audio import Clip, resample


@dataclass
class Playback:
    """The clips played, each with its start in seconds of the microphone stream (the samples
    received so far when it was sent, plus what was still queued to play before it)."""

    rate: int = 16_000
    keep_s: float = 60.0  # older audio is dropped: an echo comes back within a second
    max_delay_s: float = 0.8  # played -> heard back: the client's output and input buffering
    clips: list[tuple[float, np.ndarray]] = field(default_factory=list)

    def add(self, start_s: float, clip: Clip) -> None:
        self.clips.append((start_s, resample(clip.samples, clip.rate, self.rate).astype(np.float32)))
        self.clips = [(s, a) for s, a in self.clips if s + len(a) / self.rate > start_s - self.keep_s]

    def window(self, start_s: float, samples: int) -> np.ndarray:
        """The played audio from `start_s` on, `samples` long (zeros where nothing played)."""
        out = np.zeros(samples, np.float32)
        first = round(start_s * self.rate)
        for s, audio in self.clips:
            at = round(s * self.rate) - first
            lo, hi = max(0, at), min(samples, at + len(audio))
            if lo < hi:
                out[lo:hi] += audio[lo - at:hi - at]
        return out

    def match(self, heard: np.ndarray, start_s: float) -> float:
        """The best normalized correlation of `heard` (starting at `start_s` of the stream) with
        the played audio at a delay of 0 to `max_delay_s`; 0 where nothing played over it. Heard
        speech before or after the played sound counts in the norm: a user who spoke on after
        the echo ended is mostly not the echo."""
        lag = round(self.max_delay_s * self.rate)
        heard = np.asarray(heard, np.float64)
        ref = self.window(start_s - self.max_delay_s, len(heard) + lag).astype(np.float64)
        loud = np.flatnonzero(ref)
        if not len(heard) or not len(loud):
            return 0.0
        # corr[k] = sum_t heard[t] * ref[t + k] (ref[k:] lines up with heard when it was played max_delay - k
        # before it); only heard[loud[0] - lag : loud[-1] + 1] meets played sound, so only that is transformed
        lo, hi = max(0, loud[0] - lag), min(len(heard), loud[-1] + 1)
        if lo >= hi:
            return 0.0
        part, near = heard[lo:hi], ref[lo:hi + lag]
        size = 1 << int(np.ceil(np.log2(len(near) + len(part))))
        corr = np.fft.irfft(np.fft.rfft(near, size) * np.conj(np.fft.rfft(part, size)), size)[:lag + 1]
        energy = np.concatenate([[0.0], np.cumsum(ref ** 2)])
        energy = energy[len(heard):len(heard) + lag + 1] - energy[:lag + 1]  # of each window of ref
        score = np.abs(corr) / np.sqrt(energy * float(heard @ heard) + 1e-12)
        score[energy < 1e-6 * len(heard)] = 0.0  # next to no played sound under it: no echo
        return float(score.max())
