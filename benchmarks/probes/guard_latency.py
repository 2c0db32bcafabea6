"""Each head's median over repeated passes of its marginal p50 (and its embedding-alone p50), per message language,
from the output of `REPEAT=5 bash benchmarks/probes/guard_round.sh ROUND latency HEAD...` (guard round 9's rule (4)).

    python benchmarks/probes/guard_latency.py runs/g9/latency.out
"""

import ast
import re
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    marginal, alone, which = defaultdict(list), defaultdict(list), None
    for line in open(path, encoding="utf-8"):
        if m := re.match(r"== pass \d+, (\S+), (\w+)", line):
            which = (m.group(1), m.group(2))
        elif line.startswith("latency: ") and which:
            figures = ast.literal_eval(line[len("latency: "):])
            marginal[which].append(figures["marginal_ms"]["p50"])
            alone[which].append(figures["embedding_alone_ms"]["p50"])
    for (head, messages), values in sorted(marginal.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{messages:8s} {head}: marginal p50 median {statistics.median(values):.2f} ms over {len(values)} passes "
              f"{values}; embedding alone median {statistics.median(alone[head, messages]):.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1])
