"""Guard round 10's amendment (benchmarks/RESULTS.md, "Guard, round 10"): a trained head file whose answer thresholds
are capped at its request thresholds, per head of a gated guard, as `calibrate_kinds` does from the amendment on.
The heads of round 10 were trained before it; this rewrites their file without retraining.

    python benchmarks/probes/guard_cap.py runs/g10/C.safetensors runs/g10/C10.safetensors
"""

import sys

import numpy as np

from parley.pipeline.embed import Embedder
from parley.pipeline.guard import LABELS, GatedGuard, Guard


def main(src: str, dst: str) -> None:
    guard = Guard.load(src, Embedder.load())
    heads = (guard.english, guard.other) if isinstance(guard, GatedGuard) else (guard,)
    for head in heads:
        set_answer_thresholds(head, np.minimum(head.answer_thresholds, head.thresholds))
    print(f"wrote {guard.save(dst)}")


def set_answer_thresholds(head: Guard, new: np.ndarray) -> None:
    """Give `head` the answer thresholds `new`, printing each that changes."""
    print(f"{head.trunk}: answer thresholds " + ", ".join(
        f"{k} {a:.3f}" + (f" -> {c:.3f}" if c != a else "") for k, a, c in zip(LABELS, head.answer_thresholds, new)))
    head.answer_thresholds, head.per_kind = new, True


if __name__ == "__main__":
    main(*sys.argv[1:3])
