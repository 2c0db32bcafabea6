"""The output check's own-split figures: answer sentences (kind "answer") of the unseen fold and the generator-seed
split that each head flags, with its thresholds as shipped. Until round 10 the own-split lines of benchmarks/guard.py
counted answers among harmful requests (about 1% of them), so a head could move there without the rule figures
showing it (guard round 9, benchmarks/RESULTS.md); `guard_answer_split.py` splits the same judgements further.

    OMP_NUM_THREADS=2 python benchmarks/probes/guard_answers.py runs/g9/S.safetensors runs/g9/C.safetensors
"""

import sys

from guard_answer_split import judged

from parley.train.guard_data import load_all, split


def main(heads: list[str]) -> None:
    s = split(load_all())
    for name in ("unseen written", "by seed"):
        answers = [e for e in s.test[name] if e.kind == "answer"]
        for head, scores in judged(heads, answers):
            harmful = [v.principle is not None for e, v in zip(answers, scores) if e.label]
            benign = [v.principle is not None for e, v in zip(answers, scores) if not e.label]
            print(f"{head}, {name}: harmful answer sentences flagged {sum(harmful)}/{len(harmful)}, "
                  f"benign ones flagged {sum(benign)}/{len(benign)}")


if __name__ == "__main__":
    main(sys.argv[1:])
