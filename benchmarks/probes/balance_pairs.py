"""Alignment round 7 (benchmarks/RESULTS.md, "Alignment, issue 12 (seventh round)"): the constitutional run's
preference pairs with as many pairs that reject the principle's refusal (source "rails": a benign look-alike's
helpful answer over the refusal) as pairs that choose it (source "revision": the refusal over the base's answer to
a harmful request). In round 6 the rails' pairs were 1,150 of 2,002, the refusal one template per principle, and
DPO learned to stop refusing everything. The rails' pairs kept are the first by the SHA-256 of their prompt, so
the choice is fixed by the data alone.

    python benchmarks/probes/balance_pairs.py runs/cai-b/pairs.jsonl runs/dpo7-pairs.jsonl
"""

import hashlib
import json
import sys
from collections import Counter

from parley.train.preferences import load_pairs, write_pairs


def main(src: str, dst: str) -> None:
    pairs = load_pairs(src)
    revision = [p for p in pairs if p.source == "revision"]
    rails = sorted((p for p in pairs if p.source == "rails"),
                   key=lambda p: hashlib.sha256(json.dumps(p.prompt, ensure_ascii=False).encode()).hexdigest())
    kept = revision + rails[:len(revision)]
    print(f"{src}: {dict(Counter(p.source for p in pairs))}; kept {dict(Counter(p.source for p in kept))}")
    print(f"wrote {write_pairs(dst, kept)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
