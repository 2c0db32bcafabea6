"""The wav2vec 2.0 recogniser that `parley train asr` trained from scratch, scored as
benchmarks/voice.py scores every recogniser (its asr_table: the same held-out sentences and
voices, WER pooled per voice, RTF), beside Whisper tiny.en; and its loss curve as a PNG.

    parley train asr recipes/asr-tiny.toml                      # first: the run (runs/asr-tiny)
    python benchmarks/asr_train.py                              # 40 sentences x 5 held-out voices
    python benchmarks/asr_train.py --short                      # 8 sentences x 3 voices
    python benchmarks/asr_train.py --run runs/asr-quick --no-whisper

None of these voices (piper's joe, espeak-ng en-us, en-gb, en-us+f3, en-gb-x-rp+m3) spoke in
training (parley/voice/speech_data.py refuses them), and none of the sentences (the held-out
intents set) is in the training text. The same row comes out of
`python benchmarks/voice.py --wav2vec2 runs/asr-tiny/model` with the other tables. The project has
no recorded (non-synthesized) test clips, so there is no real-speech row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))


def char_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(character edit distance, characters in the reference), both normalised as WER is: the
    word-level distance over texts whose "words" are single characters (space and apostrophe
    spelled as tokens that normalising keeps)."""
    from parley.voice.asr import normalize, word_edits

    def spelled(text: str) -> str:
        return " ".join({" ": "zz", "'": "qq"}.get(c, c) for c in " ".join(normalize(text)))

    return word_edits(spelled(reference), spelled(hypothesis))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/asr-tiny", help="the run folder of `parley train asr`")
    parser.add_argument("--short", action="store_true", help="8 sentences, 3 voices")
    parser.add_argument("--no-whisper", action="store_true", help="leave Whisper tiny.en out of the table")
    parser.add_argument("--plot", default=str(ROOT / "asr_tiny_loss.png"), help="where the loss plot goes")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "model" / "config.json").is_file():
        print(f"no trained model in {run}/model: run `parley train asr recipes/asr-tiny.toml` first", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    from voice import VOICES, asr_table, heldout_sentences

    from parley.voice.asr import load_asr

    torch.set_flush_denormal(True)
    sentences, voices = heldout_sentences(8 if args.short else 40), VOICES[:3] if args.short else VOICES
    recognisers = {f"wav2vec 2.0 trained here ({run.name})": load_asr(str(run / "model"))}
    if not args.no_whisper:
        recognisers["whisper tiny.en int8, greedy (default)"] = load_asr("default")
    rows, spoken = asr_table(sentences, voices, recognisers)
    print(f"{len(sentences)} held-out sentences per voice; the run's own figures: {run / 'result.json'}")
    print("\n".join(rows))
    ours = next(iter(recognisers.values()))  # words are all or nothing: the character error rate shows more
    cer = {v: np.sum([char_edits(t, ours.transcribe(c).text) for t, c in zip(sentences, spoken[v])], axis=0)
           for v in voices}
    print("\n| character error rate | " + " | ".join(voices) + " |\n" + "|---" * (len(voices) + 1) + "|\n"
          f"| {next(iter(recognisers))} | " + " | ".join(f"{e / n:.3f}" for e, n in cer.values()) + " |")
    for text, clip in list(zip(sentences, spoken[voices[0]]))[:3]:
        print(f"  {voices[0]}: {text!r} -> {ours.transcribe(clip).text!r}")
    if (run / "result.json").is_file():
        result = json.loads((run / "result.json").read_text())
        print(json.dumps({k: v for k, v in result.items() if k.startswith(("wer", "val_loss", "params",
                                                                           "train_hours", "step"))}))
    if (run / "loss.png").is_file():
        shutil.copyfile(run / "loss.png", args.plot)
        print(f"loss plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
