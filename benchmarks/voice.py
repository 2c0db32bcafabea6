"""Voice, side by side in one run: word error rate of each speech recogniser on held-out synthesized
speech, real-time factors of recognition and synthesis, voice activity detection under noise, and
the voice turn's latency from the end of speech to the first audio of the answer.

    python benchmarks/voice.py                 # 40 sentences, 5 voices, 5 voice turns with SmolLM2
    python benchmarks/voice.py --short         # 8 sentences, 3 voices, 2 turns (a minute or two)
    python benchmarks/voice.py --wav2vec2 DIR  # also a Wav2Vec2ForCTC folder as a recogniser
    python benchmarks/voice.py --write         # append the tables to benchmarks/RESULTS.md
    python benchmarks/voice.py --short --turns-only   # only the voice turns (2), the quickest look

Speech: the held-out intent utterances (benchmarks/data/intents_heldout.yml, out_of_scope and
URLs left out, 4+ words), spoken by piper's joe voice and by espeak-ng voices; no recogniser
here was trained on any of them. WER is after parley.voice.asr.normalize (lower case, no
punctuation, small numbers spelled out), pooled over all sentences of a voice.
Real-time factor = compute seconds / audio seconds (< 1 is faster than real time).
VAD: utterances in quiet, joined by 0.8 s gaps, white noise added at each SNR; frame-level
precision and recall (20 ms frames) against where the clean speech is above -40 dBFS.
Voice turn: a spoken question (piper) -> endpointing -> Whisper -> the assistant's default
pipeline on SmolLM2 (greedy) -> the first sentence, or first clause of 4+ words, or first 4
words of a sentence of 8 or more (the live route's cut), -> piper. The endpointer waits for
500 ms of quiet (EnergyVAD.min_silence_ms) before it knows speech has ended: that wait is part
of the latency and is counted; the rest is measured. Side by side, the end-of-turn rule of the
live voice route (parley.voice.vad.EndOfTurn): Whisper runs from 100 ms of quiet, and a
transcript that reads as finished ends the turn at 200 ms of quiet or when it is ready
(max(200, 100 + ASR)); otherwise the turn ends after 600 ms of quiet, with the transcript made
meanwhile (max(600, 200 + ASR): a second one at 200 ms); its Whisper
reads a window fitted to the clip instead of 30 s (WhisperASR window=0; its WER is in the table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from record import append_section, commit, cpu_name

from parley.serve.routes_voice import FIRST_CLAUSE, FIRST_WORDS  # the first spoken piece, as the live route cuts it

ROOT = Path(__file__).resolve().parent
VOICES = ["joe", "espeak:en-us", "espeak:en-gb", "espeak:en-us+f3", "espeak:en-gb-x-rp+m3"]


def heldout_sentences(n: int) -> list[str]:
    examples = yaml.safe_load((ROOT / "data" / "intents_heldout.yml").read_text())["examples"]
    texts = [t for intent, ts in examples.items() if intent != "out_of_scope" for t in ts
             if len(t.split()) >= 4 and not re.search(r"\w\.(com|org|net|io)\b|http|/", t)]
    random.Random(0).shuffle(texts)
    return texts[:n]


def to16k(clip):
    from parley.voice.audio import Clip, resample

    return Clip(resample(clip.samples, clip.rate, 16_000), 16_000)


def asr_table(sentences, voices, recognisers) -> tuple[list[str], dict]:
    """WER per (recogniser, voice) and the recognisers' RTF; the synthesizers' RTF per voice."""
    from parley.voice.asr import word_edits
    from parley.voice.tts import load_tts

    spoken, tts_rtf = {}, {}
    for voice in voices:
        tts = load_tts(voice)
        tts.synthesize("Warm up.")
        start, clips = time.perf_counter(), [tts.synthesize(s) for s in sentences]
        tts_rtf[voice] = (time.perf_counter() - start) / sum(c.seconds for c in clips)
        spoken[voice] = [to16k(c) for c in clips]
    rows, asr_rtf = [], {}
    for name, asr in recognisers.items():
        asr.transcribe(spoken[voices[0]][0])  # warm up
        errors, compute, audio = {}, 0.0, 0.0
        for voice in voices:
            edits = words = 0
            for text, clip in zip(sentences, spoken[voice]):
                start = time.perf_counter()
                heard = asr.transcribe(clip).text
                compute += time.perf_counter() - start
                audio += clip.seconds
                e, w = word_edits(text, heard)
                edits, words = edits + e, words + w
            errors[voice] = edits / words
        asr_rtf[name] = compute / audio
        rows.append(f"| {name} | " + " | ".join(f"{errors[v]:.3f}" for v in voices) + f" | {asr_rtf[name]:.3f} |")
    head = ["| recogniser | " + " | ".join(f"WER {v}" for v in voices) + " | RTF |",
            "|---" * (len(voices) + 2) + "|"]
    tts_rows = ["", "| voice | synthesis RTF |", "|---|---|"] + [f"| {v} | {r:.3f} |" for v, r in tts_rtf.items()]
    return head + rows + tts_rows, spoken


def vad_table(clips) -> list[str]:
    from parley.voice.audio import Clip
    from parley.voice.vad import EnergyVAD, SileroVAD

    gap = np.zeros(int(0.8 * 16_000), np.float32)
    audio = np.concatenate([gap] + [x for c in clips for x in (c.samples, gap)])
    frame = 320
    n = len(audio) // frame
    audio = audio[:n * frame]
    level = 10 * np.log10(np.mean(audio.reshape(n, frame).astype(np.float64) ** 2, axis=1) + 1e-12)
    truth = level > -40
    power = float(np.mean(audio[np.repeat(truth, frame)] ** 2))
    rows = ["| SNR | energy precision / recall | silero precision / recall | energy / silero ms per s of audio |",
            "|---|---|---|---|"]
    for snr in (None, 20, 10, 5, 0):
        noisy = audio.copy()
        if snr is not None:
            noise = np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32)
            noisy += noise * np.sqrt(power / 10 ** (snr / 10))
        clip, cells, speed = Clip(noisy, 16_000), [], []
        for vad in (EnergyVAD(), SileroVAD()):
            start = time.perf_counter()
            found = vad.segments(clip)
            speed.append((time.perf_counter() - start) * 1000 / clip.seconds)
            said = np.zeros(n, bool)
            for s, e in found:
                said[int(s * 50):int(e * 50)] = True
            hit = (said & truth).sum()
            cells.append(f"{hit / max(said.sum(), 1):.2f} / {hit / truth.sum():.2f}")
        rows.append(f"| {'clean' if snr is None else f'{snr} dB'} | {cells[0]} | {cells[1]} | "
                    f"{speed[0]:.1f} / {speed[1]:.1f} |")
    return rows


def turn_table(questions: list[str], asr, fitted) -> list[str]:
    """The fixed wait with `asr` (Whisper's 30 s window) beside the end-of-turn rule with `fitted`
    (the window fitted to the clip, as the live route runs it); the turn itself is measured once."""
    from parley.chat import Session
    from parley.pipeline.assistant import Assistant, AssistantConfig
    from parley.pipeline.frames import ShownText
    from parley.voice.tts import load_tts, sentences
    from parley.voice.vad import EndOfTurn, EnergyVAD

    tts, wait, rule = load_tts("default"), EnergyVAD().min_silence_ms, EndOfTurn()
    rows = ["| question | ASR ms | to first text ms | to first sentence/clause ms | TTS ms | measured ms "
            "| + endpoint wait = total ms | fitted-window ASR ms | heard as finished | end-of-turn rule total ms |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    totals, adaptive = [], []
    with tempfile.TemporaryDirectory() as tmp:
        session = Session(Assistant.build(AssistantConfig(db=f"{tmp}/parley.db", temperature=0, max_tokens=96)))
        list(session.say("Hello!"))  # warm up every stage
        for question in questions:
            session.new_conversation()
            clip = to16k(tts.synthesize(question))
            t0 = time.perf_counter()
            heard = asr.transcribe(clip).text
            t1 = time.perf_counter()
            shown, first_text = ShownText(), []

            def pieces():
                for frame in session.say(heard or question):
                    if (piece := shown(frame)) and not first_text:
                        first_text.append(time.perf_counter())
                    yield piece

            said = sentences(pieces(), first_clause=FIRST_CLAUSE, first_words=FIRST_WORDS)
            first = next(said, "")
            t2 = time.perf_counter()
            if first:
                tts.synthesize(first)
            t3 = time.perf_counter()
            for _ in said:  # let the turn finish (and be saved): not part of the latency
                pass
            t4 = time.perf_counter()
            quick = fitted.transcribe(clip).text
            fit_ms = (time.perf_counter() - t4) * 1000
            ms = [(t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000]
            totals.append(sum(ms) + wait)
            done = rule.finished(quick)
            heard_end = (max(rule.short_ms, rule.guess_ms + fit_ms) if done
                         else max(rule.long_ms, rule.short_ms + fit_ms))
            adaptive.append(heard_end + ms[1] + ms[2])
            text_ms = (first_text[0] - t1) * 1000 if first_text else float("nan")
            rows.append(f"| {question} | {ms[0]:.0f} | {text_ms:.0f} | {ms[1]:.0f} | {ms[2]:.0f} | {sum(ms):.0f} | "
                        f"{sum(ms) + wait:.0f} | {fit_ms:.0f} | {'yes' if done else 'no'} | {adaptive[-1]:.0f} |")
        session.close()
    rows.append(f"\nmedian end of speech -> first audio: {np.median(totals):.0f} ms with the fixed 500 ms wait, "
                f"{np.median(adaptive):.0f} ms with the end-of-turn rule (goal < 700 ms)")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="8 sentences, 3 voices, 2 turns")
    parser.add_argument("--wav2vec2", default="", help="a Wav2Vec2ForCTC folder to score as well")
    parser.add_argument("--turns-only", action="store_true",
                        help="only the voice-turn latency table (no WER, RTF, VAD)")
    parser.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--note", default="", help="a remark for the written section (e.g. the machine was loaded)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    from parley.voice.asr import WhisperASR, load_asr, whisper_folder

    n, voices, turns = (8, VOICES[:3], 2) if args.short else (40, VOICES, 5)
    sentences = heldout_sentences(n)
    recognisers = {"whisper tiny.en int8, greedy (default)": load_asr("default"),
                   "whisper tiny.en int8, beam 5": WhisperASR(whisper_folder("default"), beam_size=5),
                   "whisper tiny.en int8, greedy, window fitted to the clip (live route)": load_asr("default",
                                                                                                  window=0)}
    if args.wav2vec2:
        recognisers[f"wav2vec 2.0 ({Path(args.wav2vec2).name})"] = load_asr(args.wav2vec2)
    started = time.perf_counter()
    asr_rows, vad_rows = [], []
    if not args.turns_only:
        asr_rows, spoken = asr_table(sentences, voices, recognisers)
        print("\n".join(asr_rows), flush=True)
        vad_rows = vad_table(spoken["joe"])
        print("\n" + "\n".join(vad_rows), flush=True)
    turn_rows = turn_table(heldout_sentences(n + turns)[n:], recognisers["whisper tiny.en int8, greedy (default)"],
                           recognisers["whisper tiny.en int8, greedy, window fitted to the clip (live route)"])
    print("\n" + "\n".join(turn_rows), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.write:
        command = "python benchmarks/voice.py" + (" --short" if args.short else "") + \
            (" --turns-only" if args.turns_only else "") + \
            (f" --wav2vec2 {args.wav2vec2}" if args.wav2vec2 else "")
        section = (f"\n## Voice: recognition, synthesis, VAD, voice-turn latency ({dt.date.today()})\n\n"
                   f"Commit {commit()}, {cpu_name(flags=True)}, {torch.get_num_threads()} threads. "
                   f"Command: `{command} --write`. {len(sentences)} held-out sentences per voice. "
                   f"{args.note}\n\n" + ("\n".join(asr_rows) + "\n\nVAD (frame-level, 20 ms):\n\n" +
                                          "\n".join(vad_rows) + "\n\n" if asr_rows else "") +
                   "Voice turn (SmolLM2, default pipeline):\n\n" +
                   "\n".join(turn_rows) + "\n")
        append_section(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
