"""Intent classification on held-out utterances: accuracy, macro-F1, per intent, confusions.

    .venv/bin/python benchmarks/intents.py            # print the figures
    .venv/bin/python benchmarks/intents.py --write    # and append them to benchmarks/RESULTS.md

Trains the head on parley/data/intents.yml exactly as `parley train intents` does, then
predicts benchmarks/data/intents_heldout.yml, a separate set written in other words (never
used for training; no line within MiniLM cosine 0.75 of a training line, see heldout_overlap.py),
with ~20 `out_of_scope` utterances that no intent covers. A prediction counts when it names the labelled intent; an out-of-scope utterance counts when the top
probability falls under the threshold. Macro-F1 averages the F1 of every label, out_of_scope
included. The threshold sweep reuses the same probabilities.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import os
import platform
import sys
import time
from pathlib import Path

import torch
import yaml

from record import append_section, commit

from parley.pipeline.embed import Embedder
from parley.pipeline.nlu import DEFAULT_INTENTS, OUT_OF_SCOPE, IntentClassifier, load_intents

HERE = Path(__file__).resolve().parent
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7)


def load_heldout(path: Path, names: list[str]) -> list[tuple[str, str]]:
    doc = yaml.safe_load(path.read_text())
    examples = doc.get("examples") if isinstance(doc, dict) else None
    if not isinstance(examples, dict):
        sys.exit(f"{path}: expected `examples:` mapping intent name -> list of utterances")
    unknown = sorted(set(examples) - set(names) - {OUT_OF_SCOPE})
    if unknown:
        sys.exit(f"{path}: unknown intents {', '.join(unknown)} (known: {', '.join(names)}, {OUT_OF_SCOPE})")
    return [(str(text), name) for name, texts in examples.items() for text in texts]


def scores(pairs: list[tuple[str, str]], labels: list[str]) -> dict[str, tuple[int, float, float, float]]:
    """label -> (support, precision, recall, F1) for (true, predicted) pairs."""
    out = {}
    for label in labels:
        tp = sum(t == p == label for t, p in pairs)
        predicted = sum(p == label for _, p in pairs)
        support = sum(t == label for t, _ in pairs)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[label] = (support, precision, recall, f1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_INTENTS)
    parser.add_argument("--heldout", type=Path, default=HERE / "data" / "intents_heldout.yml")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--write", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = parser.parse_args()

    intents = load_intents(args.data)
    heldout = load_heldout(args.heldout, intents.names)
    embedder = Embedder.load()
    start = time.perf_counter()
    classifier = IntentClassifier.train(intents, embedder, threshold=args.threshold)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    predicted = classifier.predict_many([text for text, _ in heldout])
    per_utterance_ms = (time.perf_counter() - start) * 1000 / len(heldout)

    def at(threshold: float) -> list[tuple[str, str]]:
        return [(true, p.ranking[0][0] if p.confidence >= threshold else OUT_OF_SCOPE)
                for (_, true), p in zip(heldout, predicted)]

    labels = intents.names + [OUT_OF_SCOPE]
    pairs = at(args.threshold)
    table = scores(pairs, labels)
    accuracy = sum(t == p for t, p in pairs) / len(pairs)
    macro_f1 = sum(f1 for _, _, _, f1 in table.values()) / len(labels)
    in_scope = [(t, p.ranking[0][0]) for (_, t), p in zip(heldout, predicted) if t != OUT_OF_SCOPE]
    top1 = sum(t == p for t, p in in_scope) / len(in_scope)
    confusions = collections.defaultdict(list)
    for (text, true), (_, guess) in zip(heldout, pairs):
        if true != guess:
            confusions[(true, guess)].append(text)

    lines = [f"Trained on {sum(len(i.examples) for i in intents)} examples of {len(intents.names)} intents "
             f"in {train_s:.1f} s (embedding included); {len(heldout)} held-out utterances "
             f"({len(heldout) - len(in_scope)} out of scope; set sha256 "
             f"{hashlib.sha256(args.heldout.read_bytes()).hexdigest()[:12]}), {per_utterance_ms:.1f} ms each in a batch. "
             f"Threshold {args.threshold}.", "",
             f"**Accuracy {accuracy:.1%}, macro-F1 {macro_f1:.3f}**; in-scope top-1 before the threshold "
             f"{top1:.1%}.", "",
             "| intent | n | precision | recall | F1 |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {n} | {p:.2f} | {r:.2f} | {f:.2f} |" for label, (n, p, r, f) in table.items()]
    lines += ["", "Threshold sweep (same probabilities):", "",
              "| threshold | accuracy | in-scope routed | out-of-scope rejected |", "|---|---|---|---|"]
    for threshold in SWEEP:
        swept = at(threshold)
        inside = [(t, p) for t, p in swept if t != OUT_OF_SCOPE]
        outside = [(t, p) for t, p in swept if t == OUT_OF_SCOPE]
        lines.append(f"| {threshold} | {sum(t == p for t, p in swept) / len(swept):.1%} | "
                     f"{sum(t == p for t, p in inside) / len(inside):.1%} | "
                     f"{sum(p == OUT_OF_SCOPE for _, p in outside) / len(outside):.1%} |")
    lines += ["", "Confusions (true -> predicted: count, examples):", ""]
    for (true, guess), texts in sorted(confusions.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"- {true} -> {guess}: {len(texts)} ({'; '.join(repr(t) for t in texts[:3])})")
    report = "\n".join(lines)
    print(report)

    if args.write:
        section = (f"\n## Intent classification, held out (benchmarks/intents.py, {datetime.date.today()}, "
                   f"commit {commit()})\n\nMachine: {platform.machine()}, {os.cpu_count()} cores, torch "
                   f"{torch.__version__}. Command: `.venv/bin/python benchmarks/intents.py --write`.\n\n{report}\n")
        append_section(section)


if __name__ == "__main__":
    main()
