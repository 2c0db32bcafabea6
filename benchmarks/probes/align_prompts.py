"""A prompts file for `parley train rl ... refusal_reward=W` with a chosen share of requests to decline
(issue 12, alignment round 9): the training split of the alignment requests (requests.toml with its
variants, the retired held-out sets, everyday.toml), each line {"prompt": [the user's message],
"refuse": true|false, "principle", "origin", "source"}; every request to be answered is kept, the ones
to decline are sampled (seeded) down to the share asked. GRPO normalises rewards within each request's
group, so a heavier weight on one kind of mistake changes nothing; what changes how often a step's
gradient says "answer this" is how many of its requests should be answered.

    python benchmarks/probes/align_prompts.py --harmful-share 0.25 --out runs/rl9-prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from parley.files import atomic_open  # noqa: E402
from parley.train.align_data import EVERYDAY, training_requests  # noqa: E402


def build(harmful_share: float, seed: int) -> list[dict]:
    if not 0 < harmful_share < 1:
        raise SystemExit(f"--harmful-share must be between 0 and 1 (exclusive), not {harmful_share}")
    seen, harmful, benign = set(), [], []
    for r in training_requests(split="train", everyday=EVERYDAY):
        if r.text in seen:
            continue
        seen.add(r.text)
        (harmful if r.harmful else benign).append({"prompt": [{"role": "user", "content": r.text}],
                                                   "refuse": r.harmful, "principle": r.principle,
                                                   "origin": r.origin, "source": r.source})
    wanted = round(len(benign) * harmful_share / (1 - harmful_share))
    if wanted > len(harmful):
        raise SystemExit(f"only {len(harmful)} requests to decline for {len(benign)} to answer: a share of "
                         f"{harmful_share} needs {wanted}")
    rng = random.Random(seed)
    rows = rng.sample(harmful, wanted) + benign
    rng.shuffle(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harmful-share", type=float, required=True, help="share of the lines to be declined")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = build(args.harmful_share, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    kinds = Counter("decline" if r["refuse"] else r["origin"].split("/")[0] if r["origin"].startswith(
        ("ordinary", "benign")) else "look-alike" for r in rows)
    print(f"{out}: {len(rows)} prompts, {dict(kinds)}")


if __name__ == "__main__":
    main()
