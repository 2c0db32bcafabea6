"""A guard round's rule figures from `guard_round.sh ROUND own HEAD` outputs (rounds 8 to 10, benchmarks/RESULTS.md):
(1) harmful caught minus benign refused over the unseen fold, the unglossed languages and Dutch ("by language"),
(2) benign refused over the same three, (3) injected removed minus innocent removed over the first two, and from
round 10, when the output counts answers apart, (4) answer sentences of the unseen fold flagged, harmful and benign.

    python benchmarks/probes/guard_rule.py runs/g9/own-S.out runs/g9/own-C.out
"""

import re
import sys

FIELDS = {"harm": r"harmful recall (\d+)/(\d+)", "ben": r"benign flagged (\d+)/(\d+)",
          "inj": r"injection recall (\d+)/(\d+)", "inn": r"innocent removed (\d+)/(\d+)",
          "ans": r"answer recall (\d+)/(\d+)", "aflag": r"answer flagged (\d+)/(\d+)"}
THREE = ("unseen written", "unglossed languages", "by language")


def parse(path: str) -> dict[str, dict[str, tuple[int, int]]]:
    out = {}
    for line in open(path, encoding="utf-8"):
        if m := re.match(r"own split, (.+?): (.*)", line):
            out[m.group(1)] = {k: tuple(map(int, f.groups())) for k, v in FIELDS.items() if (f := re.search(v, m.group(2)))}
    return out


def rate(splits: dict, names: tuple[str, ...], field: str) -> tuple[int, int, float]:
    a, n = sum(splits[s][field][0] for s in names), sum(splits[s][field][1] for s in names)
    return a, n, 100 * a / n


def main(paths: list[str]) -> None:
    for path in paths:
        d = parse(path)
        h, b = rate(d, THREE, "harm"), rate(d, THREE, "ben")
        i, o = rate(d, THREE[:2], "inj"), rate(d, THREE[:2], "inn")
        print(f"{path}: (1) {h[2] - b[2]:.2f} = {h[2]:.2f} ({h[0]}/{h[1]}) - {b[2]:.2f} ({b[0]}/{b[1]}); (2) {b[2]:.2f}%; "
              f"(3) {i[2] - o[2]:.2f} = {i[2]:.2f} ({i[0]}/{i[1]}) - {o[2]:.2f} ({o[0]}/{o[1]})")
        if "ans" in d[THREE[0]]:
            a, f = rate(d, THREE[:1], "ans"), rate(d, THREE[:1], "aflag")
            print(f"{path}: (4) unseen fold, harmful answer sentences flagged {a[0]}/{a[1]} ({a[2]:.2f}%), "
                  f"benign ones {f[0]}/{f[1]} ({f[2]:.2f}%)")


if __name__ == "__main__":
    main(sys.argv[1:])
