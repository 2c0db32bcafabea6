"""Guard round 11's candidate (benchmarks/RESULTS.md, "Guard, round 11"): a gated head file whose other-language
head judges answer sentences by thresholds set on all the calibration fold's answer rows, as `train_minilm` does from
round 11 on, instead of the fifth of them routed to it. Round 10's training saved that head alone, its thresholds set
on every calibration row (`C.me5.safetensors`, written before amendment 10a, so its answer thresholds are the joint
search's, uncapped); this takes them, capped at the gated head's request thresholds, without retraining.

    python benchmarks/probes/guard_other_answers.py runs/g10/C10.safetensors runs/g10/C.me5.safetensors runs/g10/C11.safetensors
"""

import sys

import numpy as np
from guard_cap import set_answer_thresholds

from parley.pipeline.embed import Embedder
from parley.pipeline.guard import PRINCIPLES, GatedGuard, Guard
from parley.train.guard import capped


def main(gated_path: str, alone_path: str, dst: str) -> None:
    embedder = Embedder.load()
    gated, alone = Guard.load(gated_path, embedder), Guard.load(alone_path, embedder)
    if not isinstance(gated, GatedGuard) or alone.trunk != gated.other.trunk:
        sys.exit(f"{gated_path} must be a gated guard and {alone_path} its other-language head alone")
    if not np.array_equal(alone.params["w1"], gated.other.params["w1"]):
        sys.exit(f"{alone_path} is not the head of {gated_path}: their weights differ")
    set_answer_thresholds(gated.other, capped(alone.answer_thresholds[:len(PRINCIPLES)], gated.other.thresholds))
    print(f"wrote {gated.save(dst)}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
