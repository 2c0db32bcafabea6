"""Answer sentences of the unseen fold flagged per head, split by what they are (harmful, benign hard negatives of
an [[answer]] entry or requests.toml, ordinary [[plain]] answers), by the head of the gate that judged them and by
principle (guard round 10, condition 4; benchmarks/RESULTS.md). Judged as the output check judges them (kind answer).

    OMP_NUM_THREADS=2 python benchmarks/probes/guard_answer_split.py runs/g10/S.safetensors runs/g10/C10.safetensors
"""

import sys
from collections import Counter

import torch

from parley.pipeline.embed import Embedder
from parley.pipeline.guard import Guard
from parley.train.guard_data import load_all, split


def judged(heads: list[str], answers: list) -> list[tuple[str, list]]:
    """Each head file's scores of the answer sentences `answers`, judged as the output check judges them."""
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    embedder = Embedder.load()
    return [(path, Guard.load(path, embedder).score_many([e.text for e in answers], kind="answer")) for path in heads]


def main(heads: list[str]) -> None:
    answers = [e for e in split(load_all()).test["unseen written"] if e.kind == "answer"]
    for path, scores in judged(heads, answers):
        groups, flagged = Counter(), Counter()
        for e, s in zip(answers, scores):
            what = "harmful" if e.label else "plain" if e.base.startswith("plain:") else "hard negative"
            head = s.head.split(" ")[0] or "one head"
            for key in (what, f"{what}, {head}"):
                groups[key] += 1
                flagged[key] += s.principle is not None
            if s.principle is not None and not e.label:
                flagged[f"benign flagged as {s.principle}"] += 1
        print(path)
        for key in sorted(groups):
            print(f"  {key}: {flagged[key]}/{groups[key]}")
        print("  " + ", ".join(f"{k} {v}" for k, v in sorted(flagged.items()) if k.startswith("benign flagged")))


if __name__ == "__main__":
    main(sys.argv[1:])
