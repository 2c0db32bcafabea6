"""The output check's own-split figures: answer sentences (requests.toml's harmful_answers and benign_answers, kind
"answer") of the unseen fold and the generator-seed split that each head flags, with its thresholds as shipped. The
own-split lines of benchmarks/guard.py count answers among harmful requests (about 1% of them), so a head can move
there without the rule figures showing it (guard round 9, benchmarks/RESULTS.md).

    OMP_NUM_THREADS=2 python benchmarks/probes/guard_answers.py runs/g9/S.safetensors runs/g9/C.safetensors
"""

import sys

import torch

from parley.pipeline.embed import Embedder
from parley.pipeline.guard import Guard
from parley.train.guard_data import load_all, split


def main(heads: list[str]) -> None:
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    s = split(load_all())
    embedder = Embedder.load()
    for head in heads:
        guard = Guard.load(head, embedder)
        for name in ("unseen written", "by seed"):
            answers = [e for e in s.test[name] if e.kind == "answer"]
            scores = guard.score_many([e.text for e in answers], kind="answer")  # as the output check judges them
            harmful = [v.principle is not None for e, v in zip(answers, scores) if e.label]
            benign = [v.principle is not None for e, v in zip(answers, scores) if not e.label]
            print(f"{head}, {name}: harmful answer sentences flagged {sum(harmful)}/{len(harmful)}, "
                  f"benign ones flagged {sum(benign)}/{len(benign)}")


if __name__ == "__main__":
    main(sys.argv[1:])
