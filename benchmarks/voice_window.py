"""How short a window Whisper tiny.en's encoder can read (WhisperASR window=0 cuts it to
parley.voice.asr.fitted_window, after LEAD_S of quiet, instead of faster-whisper's 30 s): WER
and time per smallest window, on held-out sentences spoken by piper and two espeak-ng voices
(as benchmarks/voice.py). The 30 s row is the plain 30 s window, no lead (load_asr's default).

    python benchmarks/voice_window.py                  # 30 sentences x 3 voices; windows 6,8,10,12,30 s
    python benchmarks/voice_window.py --short          # 8 sentences x 3 voices
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from voice import VOICES, heldout_sentences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="8 sentences per voice")
    parser.add_argument("--windows", default="6,8,10,12,30", help="smallest windows to try, seconds")
    args = parser.parse_args()
    from parley.voice.asr import LEAD_S, fitted_window, load_asr, word_edits
    from parley.voice.audio import resample
    from parley.voice.tts import load_tts

    asr = load_asr("default", window=0)
    clips = []
    for voice in VOICES[:3]:
        tts = load_tts(voice)
        for text in heldout_sentences(8 if args.short else 30):
            clip = tts.synthesize(text)
            clips.append((text, resample(clip.samples, clip.rate, 16_000).astype(np.float32)))
    print("| smallest window s | WER | sentences with 3+ word errors | median ms |\n|---|---|---|---|")
    for window in (int(w) for w in args.windows.split(",")):
        edits = words = bad = 0
        times = []
        for text, samples in clips:
            start = time.perf_counter()
            lead = np.zeros(int(LEAD_S * 16_000) if window < 30 else 0, np.float32)  # as WhisperASR does
            led = np.concatenate([lead, samples])
            parts, _ = asr.model.transcribe(led, language="en", beam_size=1, vad_filter=False,
                                            condition_on_previous_text=False,
                                            chunk_length=fitted_window(len(led) / 16_000, window))
            heard = " ".join(p.text.strip() for p in parts)
            times.append((time.perf_counter() - start) * 1000)
            e, w = word_edits(text, heard)
            edits, words, bad = edits + e, words + w, bad + (e > 2)
        print(f"| {window} | {edits / words:.3f} | {bad}/{len(clips)} | {np.median(times):.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
