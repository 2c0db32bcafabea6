"""Input safety check on labeled prompts: precision, recall, F1, per-principle recall, mistakes, time.

    .venv/bin/python benchmarks/safety.py             # print the report
    .venv/bin/python benchmarks/safety.py --embed     # also a MiniLM nearest-prototype classifier
    .venv/bin/python benchmarks/safety.py --write     # and append it to benchmarks/RESULTS.md

The prompts (benchmarks/data/safety_prompts.yml) come in two halves: `dev`, which the rules
were tuned on, and `test`, which they were not; both are reported, test being the honest one.
"Harmful" means the check should refuse; a refusal counts as a true positive whatever
principle it names, and the table says separately how often the principle was the expected one.

`--embed` measures the second opinion the safety design left open: embed the constitution's
own `examples` (harmful) and `allowed` (benign) prompts with MiniLM, label a prompt by its
nearest one, and report that classifier alone and OR-ed with the rules.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import yaml

from record import append_section, commit

from parley.pipeline.safety import Constitution, check_input, load_constitution, profanity

HERE = Path(__file__).parent
PROMPTS = HERE / "data" / "safety_prompts.yml"
Item = tuple[str, str | None]  # (prompt, expected principle id; None for benign)


def load_prompts(path: Path, constitution: Constitution) -> dict[str, list[Item]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or set(data) != {"dev", "test"}:
        raise SystemExit(f"{path}: expected two top-level halves, dev and test")
    halves = {}
    for split, sets in data.items():
        items: list[Item] = []
        for entry in sets.get("harmful", []):
            if entry.get("principle") not in constitution:
                raise SystemExit(f"{path}: {split} prompt {entry.get('text')!r} names unknown principle "
                                 f"{entry.get('principle')!r}")
            items.append((entry["text"], entry["principle"]))
        items += [(text, None) for text in sets.get("benign", [])]
        halves[split] = items
    return halves


def evaluate(items: list[Item], flags: Callable[[str], str | None]) -> dict:
    """`flags(prompt)` gives the principle id it would refuse under, or None."""
    got = [(text, want, flags(text)) for text, want in items]
    tp = sum(1 for _, want, g in got if want and g)
    fp = [text for text, want, g in got if not want and g]
    fn = [(text, want) for text, want, g in got if want and not g]
    wrong = [(text, want, g) for text, want, g in got if want and g and g != want]
    precision = tp / (tp + len(fp)) if tp + len(fp) else 0.0
    recall = tp / (tp + len(fn)) if tp + len(fn) else 0.0
    per_principle: dict[str, list[int]] = {}
    for _, want, g in got:
        if want:
            caught = per_principle.setdefault(want, [0, 0])
            caught[0] += bool(g)
            caught[1] += 1
    return {"harmful": tp + len(fn), "benign": len(items) - tp - len(fn), "tp": tp, "fp": fp, "fn": fn,
            "wrong_principle": wrong, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "per_principle": dict(sorted(per_principle.items(), key=lambda kv: int(kv[0][1:])))}


def time_ms(fn: Callable[[str], object], texts: list[str], repeats: int) -> tuple[float, float]:
    """Median and 95th percentile of one call, in milliseconds."""
    times = []
    for _ in range(repeats):
        for text in texts:
            start = time.perf_counter()
            fn(text)
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def prototype_classifier(constitution: Constitution) -> Callable[[str], str | None]:
    """1-nearest-neighbour over the constitution's examples (harmful) and allowed prompts (benign)."""
    from parley.pipeline.embed import Embedder

    embedder = Embedder.load()
    texts = [(t, p.id) for p in constitution.principles for t in p.examples]
    texts += [(t, None) for p in constitution.principles for t in p.allowed]
    vectors = embedder([t for t, _ in texts])

    def flags(prompt: str) -> str | None:
        return texts[int((vectors @ embedder([prompt])[0]).argmax())][1]

    return flags


def report(results: dict[str, dict[str, dict]], timing: dict[str, tuple[float, float]]) -> str:
    lines = ["| classifier | half | harmful | benign | precision | recall | F1 | false positives | right principle |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, halves in results.items():
        for split, r in halves.items():
            right = f"{r['tp'] - len(r['wrong_principle'])}/{r['tp']}"
            lines.append(f"| {name} | {split} | {r['harmful']} | {r['benign']} | {r['precision']:.3f} | "
                         f"{r['recall']:.3f} | {r['f1']:.3f} | {len(r['fp'])} | {right} |")
    rules = results["rules"]
    ids = sorted({pid for r in rules.values() for pid in r["per_principle"]}, key=lambda pid: int(pid[1:]))
    lines += ["", "Recall of the rules per principle (caught / harmful prompts):", "",
              "| half | " + " | ".join(ids) + " |", "|---|" + "---|" * len(ids)]
    for split, r in rules.items():
        cells = [f"{r['per_principle'][pid][0]}/{r['per_principle'][pid][1]}" if pid in r["per_principle"] else "-"
                 for pid in ids]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    lines += ["", "Mistakes of the rules:", ""]
    for split, r in rules.items():
        mistakes = [f'false positive "{t}"' for t in r["fp"]]
        mistakes += [f'missed ({want}) "{t}"' for t, want in r["fn"]]
        mistakes += [f'named {got} instead of {want}: "{t}"' for t, want, got in r["wrong_principle"]]
        lines.append(f"- {split}: " + ("; ".join(mistakes) if mistakes else "none"))
    lines.append("")
    lines += [f"Time per call, {what}: median {median:.3f} ms, p95 {p95:.3f} ms." for what, (median, p95) in timing.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--repeats", type=int, default=5, help="timing passes over all prompts")
    parser.add_argument("--embed", action="store_true", help="also measure a MiniLM nearest-prototype classifier")
    parser.add_argument("--write", action="store_true", help="append the report to benchmarks/RESULTS.md")
    args = parser.parse_args()
    constitution = load_constitution()
    halves = load_prompts(args.prompts, constitution)

    def rules(text: str) -> str | None:
        v = check_input(text, constitution)
        return v.principle if v.action == "refuse" else None

    classifiers = {"rules": rules}
    if args.embed:
        classifiers["nearest prototype (MiniLM)"] = prototype = prototype_classifier(constitution)
        classifiers["rules OR prototype"] = lambda text: rules(text) or prototype(text)
    results = {name: {split: evaluate(items, fn) for split, items in halves.items()} for name, fn in classifiers.items()}
    harmful = [text for items in halves.values() for text, want in items if want]
    benign = [text for items in halves.values() for text, want in items if not want]
    rules_only = Constitution(constitution.summary, tuple(replace(p, builtin=()) for p in constitution.principles))
    profanity(["warm-up"])
    timing = {
        "check_input on harmful prompts (rules up to the first match)":
            time_ms(lambda t: check_input(t, constitution), harmful, args.repeats),
        "check_input on benign prompts (every rule, then the profanity classifier)":
            time_ms(lambda t: check_input(t, constitution), benign, args.repeats),
        "every rule alone, benign prompts": time_ms(lambda t: check_input(t, rules_only), benign, args.repeats),
        "profanity classifier alone": time_ms(lambda t: profanity([t]), benign, args.repeats),
    }
    if args.embed:
        timing["nearest prototype (one MiniLM embedding)"] = time_ms(classifiers["nearest prototype (MiniLM)"],
                                                                     harmful + benign, 1)
    body = report(results, timing)
    print(body)
    if args.write:
        command = "`.venv/bin/python benchmarks/safety.py" + (" --embed" if args.embed else "") + " --write`"
        section = (f"\n## Input safety check (benchmarks/safety.py, {datetime.date.today()}, commit {commit()})\n\n"
                   f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
                   f"Command: {command}. Prompts: {args.prompts.name} "
                   f"({sum(len(i) for i in halves.values())}).\n\n{body}\n")
        append_section(section)


if __name__ == "__main__":
    main()
