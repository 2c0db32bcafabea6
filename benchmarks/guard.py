"""Benchmark the guard: its figures on its own held-out splits, on a held-out evaluation folder,
and its latency per message.

    python benchmarks/guard.py                      # own splits + latency (a few minutes on 2 cores)
    python benchmarks/guard.py --quick              # latency on 50 messages, own "unseen written" split only
    python benchmarks/guard.py --heldout benchmarks/data/guard_heldout   # the frozen evaluation sets
    python benchmarks/guard.py --head FILE          # another head than the shipped one
    python benchmarks/guard.py --every 5            # own splits on every 5th example (as the LoRA run reports)
    python benchmarks/guard.py --quick --head FILE --precision bf16   # encoders in bf16 (a head over mE5 too)
    python benchmarks/guard.py --quick --head FILE --messages other   # latency on Russian messages (a gated guard)
    python benchmarks/guard.py --quick --latency-only --head FILE     # the 50 messages' latency alone

Latency is per message, single messages as the pipeline sees them (`latency`): the input check
and the NLU stage's embedding of the same message, against that embedding alone; "marginal"
is what the guard adds. Both designs share the pipeline's pass: the frozen head reads the
embedding, a head with fine-tuned top layers (`--design encoder`) the states below them
(`Embedder.encode_sharing`), and the embedding the NLU stage needs is remembered from it. A head over mE5 (`--trunk me5`) runs its
own pass beside MiniLM's, so its marginal latency is a whole mE5 embedding and its head.
Figures depend on the machine's load: say so when you record them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from parley.pipeline.embed import Embedder  # noqa: E402
from parley.pipeline.guard import Guard, shipped_path  # noqa: E402
from parley.train.guard import describe, report  # noqa: E402
from parley.train.guard_data import Example, load_all, split  # noqa: E402


def own_splits(guard: Guard, quick: bool, every: int = 1) -> dict:
    s = split(load_all())
    sets = {name: ex[::every] for name, ex in {"calibration fold": s.val, **s.test}.items()}
    if quick:
        sets = {"unseen written": s.test["unseen written"]}
    return {name: report(guard.probabilities(texts := [e.text for e in ex]), ex,
                         guard.thresholds_for(texts, [e.kind for e in ex]))  # answers by their own thresholds
            for name, ex in sets.items()}


def load_heldout(folder: Path) -> tuple[list[Example], list[dict]]:
    """harmful.yml and benign.yml (`requests`: text, principle, category, style, ...) and
    injection.yml (`sentences`: text, `label` or `kind` injection|injected|innocent, style, ...)
    as Examples (source "heldout"), and beside each its other fields (category, style, language
    where the set has it ...) for the per-group tables."""
    import yaml

    def rows(name: str, key: str) -> list[dict]:
        path = folder / name
        if not path.is_file():
            raise SystemExit(f"{path} not found: --heldout wants the folder with harmful.yml, benign.yml, injection.yml")
        return yaml.safe_load(path.read_text(encoding="utf-8"))[key]

    def tags(r: dict) -> dict:
        return {k: str(v) for k, v in r.items() if k not in ("text", "principle", "label", "kind")}

    out = [(Example(r["text"], r["principle"], "request", "heldout"), tags(r)) for r in rows("harmful.yml", "requests")]
    out += [(Example(r["text"], "", "request", "heldout"), tags(r)) for r in rows("benign.yml", "requests")]
    for r in rows("injection.yml", "sentences"):
        kind = r.get("label", r.get("kind"))
        if kind not in ("injection", "injected", "innocent"):
            raise SystemExit(f"{folder / 'injection.yml'}: a sentence labelled {kind!r}, not injection/injected/innocent")
        out.append((Example(r["text"], "" if kind == "innocent" else "injection", "passage", "heldout"), tags(r)))
    return [e for e, _ in out], [t for _, t in out]


def with_rules(guard: Guard, examples: list[Example]) -> tuple[dict, list[bool]]:
    """Both layers as the pipeline runs them: check_input (rules, then guard) on requests,
    redact_orders (rules, then guard) on passage sentences. The figures, and per example
    whether it was refused (a request) or removed (a sentence)."""
    from parley.pipeline.safety import check_input, load_constitution
    from parley.pipeline.untrusted import redact_orders

    constitution = load_constitution()
    verdicts = {i: check_input(e.text, constitution, guard) for i, e in enumerate(examples) if e.kind == "request"}
    stopped = [verdicts[i].action == "refuse" if i in verdicts else bool(redact_orders(e.text, guard)[1])
               for i, e in enumerate(examples)]
    bad = [i for i in verdicts if examples[i].label]
    caught = [i for i in bad if stopped[i]]
    orders = [i for i, e in enumerate(examples) if e.kind == "passage" and e.label]
    innocent = [i for i, e in enumerate(examples) if e.kind == "passage" and not e.label]
    return {"harmful_recall": (len(caught), len(bad)),
            "benign_flagged": (sum(stopped[i] for i in verdicts if not examples[i].label),
                               sum(not examples[i].label for i in verdicts)),
            "right_principle": (sum(verdicts[i].principle == examples[i].label for i in caught), len(caught)),
            "injection_recall": (sum(stopped[i] for i in orders), len(orders)),
            "innocent_removed": (sum(stopped[i] for i in innocent), len(innocent)),
            "refused_by_rule": sum(verdicts[i].evidence.get("rule") is not None for i in caught)}, stopped


def by_group(stopped, examples: list[Example], tags: list[dict], which: str) -> dict[str, dict[str, tuple[int, int]]]:
    """Stopped / all of the held-out `which` ("harmful" or "benign" requests, "injected" or
    "innocent" sentences), per value of each field the set tags its rows with (category,
    style, language ...), and per principle for harmful requests."""
    groups: dict[str, dict[str, list[int]]] = {}
    for i, (e, t) in enumerate(zip(examples, tags)):
        kind = ("harmful" if e.label else "benign") if e.kind == "request" else ("injected" if e.label else "innocent")
        if kind == which:
            for field, value in (({"principle": e.label} if which == "harmful" else {}) | t).items():
                groups.setdefault(field, {}).setdefault(value, []).append(i)
    return {field: {v: (int(sum(stopped[i] for i in idx)), len(idx)) for v, idx in sorted(values.items())}
            for field, values in groups.items()}


MESSAGES = {  # the shape of a message latency is timed on: {i} numbers it, {run} makes it new to the embedder
    "english": "message {i} of {run}: how do I get from the station to the museum on day {i}?",
    "other": "сообщение {i} из {run}: как добраться от вокзала до музея в день {i}?",  # Russian: a gated guard's mE5 head
}


def latency(guard: Guard, embedder: Embedder, n: int, language: str = "english") -> dict:
    """Per message, as the pipeline runs it: the input check (`guard.score`) and then the NLU
    stage's embedding of the same message ("with guard"), against the embedding alone of another
    new message of the same shape ("embedding alone"), alternated; "marginal" is the p50 of the
    pairs' differences: what the guard adds to a turn."""
    run = time.time_ns()  # new messages in every call: the embedder remembers the texts it has seen
    texts = [MESSAGES[language].format(i=i, run=run) for i in range(2 * n + 2)]
    guard.score(texts[0]), embedder([texts[1]])  # warm up
    alone, both = [], []
    for a, b in zip(texts[2::2], texts[3::2]):
        t0 = time.perf_counter()
        embedder([a])
        t1 = time.perf_counter()
        guard.score(b)
        embedder([b])  # the NLU stage: remembered from the guard's pass (both designs embed the message)
        alone.append((t1 - t0) * 1000)
        both.append((time.perf_counter() - t1) * 1000)

    def pct(values: list[float]) -> dict:
        return {"p50": round(statistics.median(values), 2), "p95": round(sorted(values)[int(0.95 * len(values))], 2)}

    return {"messages": len(both), "language": language, "tuned_layers": len(getattr(guard.embedder, "top", ())),
            "with_guard_ms": pct(both), "embedding_alone_ms": pct(alone),
            "marginal_ms": pct([y - x for x, y in zip(alone, both)])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head", default=str(shipped_path()))
    ap.add_argument("--heldout", default="", help="a folder of held-out evaluation files")
    ap.add_argument("--quick", action="store_true", help="short run: 50 messages, one own split")
    ap.add_argument("--latency-only", action="store_true",
                    help="time the messages and read no own split (repeated latency passes, guard_round.sh)")
    ap.add_argument("--every", type=int, default=1, help="own splits: every n-th example (5: as the LoRA run)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, loaded CPU two threads made one embedding 40x slower)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                    help="MiniLM's arithmetic (a head over mE5 runs mE5 in bf16 here, else in 'auto' as the "
                         "pipeline does; benchmarks/probes/guard_precision.py compares it with fp32)")
    ap.add_argument("--messages", default="english", choices=sorted(MESSAGES),
                    help="the language of the messages latency is timed on (other: Russian, which a gated guard's "
                         "other-language head scores)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    embedder = Embedder.load(precision=args.precision)
    guard = Guard.load(args.head, embedder)
    if args.heldout:
        examples, tags = load_heldout(Path(args.heldout))
        probs = guard.probabilities(texts := [e.text for e in examples])
        limits = guard.thresholds_for(texts, [e.kind for e in examples])
        harm, order = (probs[:, :8] >= limits[:, :8]).any(axis=1), probs[:, 8] >= limits[:, 8]
        alone = [bool(harm[i] if e.kind == "request" else order[i]) for i, e in enumerate(examples)]
        both, stopped = with_rules(guard, examples)
        print(describe("held-out, guard alone", report(probs, examples, limits)))
        print(describe("held-out, rules then guard (the pipeline)", both) + f"; refused by a rule {both['refused_by_rule']}")
        for which in ("harmful", "benign", "injected", "innocent"):
            for name, flags in (("guard alone", alone), ("rules then guard", stopped)):
                for field, groups in by_group(flags, examples, tags, which).items():
                    print(f"  {which}, {name}, per {field}: " + ", ".join(f"{g} {a}/{n}" for g, (a, n) in groups.items()))
        return 0
    for name, fig in ({} if args.latency_only else own_splits(guard, args.quick, max(args.every, 1))).items():
        print(describe(f"own split, {name}", fig))
    print("latency:", latency(guard, embedder, 50 if args.quick else 300, args.messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
