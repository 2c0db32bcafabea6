"""Preference of the aligned model over the base on ordinary questions (issue 12), by two judges.

    PARLEY_HOME=... .venv/bin/python benchmarks/preference.py --reward smollm2-reward --out runs/preference.json
    .venv/bin/python benchmarks/preference.py --quick                  # 12 questions, a smoke run
    .venv/bin/python benchmarks/preference.py --report runs/preference.json   # re-print, measuring nothing
    .venv/bin/python benchmarks/preference.py ... --pairs-from runs/v4-base.json   # + pairs from a held-out round

Both models answer each question of --questions (benchmarks/data/ordinary_questions/questions.yml: written
for this, nothing near a principle) as `parley chat stages=respond` would with the rails off: Parley's system
prompt, greedy, at most --max-tokens tokens, the engine in bfloat16. Two judges compare the two answers to
each question: the reward model (the higher score wins; --reward, registered by `parley train reward`) and
the rails (parley.train.rail_pairs.rails_prefer: their input and output rules). Identical answers are ties.
The preference of aligned over base is (wins + ties / 2) / questions.

Each judge's own accuracy is measured on held-out pairs it never saw, with chosen and rejected labelled by
someone else: --pairs (pairs files; by default benchmarks/data/reward_pairs/heldout.jsonl, labelled from the
guard's harmful/benign split) and --pairs-from (a `benchmarks/alignment.py --out` file of a held-out round:
for each held-out request the base answered without declining, the principle's refusal is chosen over its
answer to a harmful request and its answer over that refusal to a benign one, the held-out set's own labels;
--pairs-limit N keeps N of them, spread over the file: scoring is the slow part on a CPU). A tie counts as a
wrong pick.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import yaml

from parley.engine.engine import Engine
from parley.pipeline.safety import load_constitution
from parley.registry import Registry
from parley.train.align_data import LOOKS_LIKE, is_refusal
from parley.train.constitutional import generate, system_prompt
from parley.train.preferences import Pair, load_pairs
from parley.train.rail_pairs import rails_prefer
from parley.train.reward import load_reward_model

HERE = Path(__file__).parent
QUESTIONS = HERE / "data" / "ordinary_questions" / "questions.yml"
PAIRS = HERE / "data" / "reward_pairs" / "heldout.jsonl"


def questions(path: Path, limit: int) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"{path} not found: --questions needs a YAML file with a `questions:` list")
    items = yaml.safe_load(path.read_text(encoding="utf-8")).get("questions") or []
    if not items or not all(isinstance(q, str) and q.strip() for q in items):
        raise SystemExit(f"{path}: `questions:` must be a non-empty list of strings")
    return items[::max(1, len(items) // limit)][:limit] if limit else items


def answers(name: str, prompts: list[list[dict]], max_tokens: int) -> list[str]:
    model, tokenizer, _ = Registry().load(name, dtype=torch.float32)
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16).eval(), max_batch=64)
    return generate(engine, tokenizer, prompts, max_tokens)


def pairs_from(path: Path, limit: int = 0) -> list[Pair]:
    """Held-out pairs from the base model's rows of an alignment.py --out file (see the module docstring);
    `limit` of them spread evenly over the file (0 = all)."""
    constitution, pairs = load_constitution(), []
    rows = json.loads(path.read_text())[0]["rows"]
    for row in rows:
        if is_refusal(row["answer"]) or not row["answer"].strip():
            continue
        prompt = [{"role": "user", "content": row["text"]}]
        if row["harmful"]:
            refusal = constitution[row["principle"]].refusal()
            pairs.append(Pair(prompt, refusal, row["answer"], row["principle"], "rails", "human", {"file": path.name}))
        else:  # a benign category names no principle: the one it resembles, else C4 (the commonest refusal)
            refusal = constitution[LOOKS_LIKE.get(row.get("category"), "C4")].refusal()
            pairs.append(Pair(prompt, row["answer"], refusal, None, "rails", "human", {"file": path.name}))
    return pairs[::max(1, len(pairs) // limit)][:limit] if limit else pairs


def judge_accuracy(pairs: list[Pair], rm) -> dict:
    """Each judge's picks on labelled pairs: right, ties (the rails only) and the pair count."""
    constitution = load_constitution()
    rails = [rails_prefer(p.prompt, p.chosen, p.rejected, constitution) for p in pairs]
    out = {"pairs": len(pairs), "rails_right": sum(v > 0 for v in rails), "rails_ties": sum(v == 0 for v in rails)}
    if rm is not None:
        chosen = rm.score_many([p.prompt for p in pairs], [p.chosen for p in pairs])
        rejected = rm.score_many([p.prompt for p in pairs], [p.rejected for p in pairs])
        out["reward_right"] = sum(c > r for c, r in zip(chosen, rejected))
    return out


def compare(prompts: list[list[dict]], aligned: list[str], base: list[str], rm) -> list[dict]:
    """Per question: both answers and each judge's verdict (+1 aligned better, -1 base better, 0 tie)."""
    constitution = load_constitution()
    scores = (rm.score_many(prompts, [a or "." for a in aligned]), rm.score_many(prompts, [b or "." for b in base])) \
        if rm is not None else None
    rows = []
    for i, (prompt, a, b) in enumerate(zip(prompts, aligned, base)):
        row = {"question": prompt[-1]["content"], "aligned": a, "base": b,
               "rails": 0 if a == b else rails_prefer(prompt, a, b, constitution)}
        if scores:
            row["reward_aligned"], row["reward_base"] = scores[0][i], scores[1][i]
            row["reward"] = 0 if a == b else (scores[0][i] > scores[1][i]) - (scores[0][i] < scores[1][i])
        rows.append(row)
    return rows


def report(result: dict) -> str:
    rows, lines = result["rows"], []
    n = len(rows)
    lines += [f"{n} ordinary questions: {result['aligned']} (aligned) against {result['base']} (base), "
              f"{sum(r['aligned'] == r['base'] for r in rows)} identical answers; answers that decline "
              f"(align_data.is_refusal): aligned {sum(is_refusal(r['aligned']) for r in rows)}, "
              f"base {sum(is_refusal(r['base']) for r in rows)}", "",
              "| judge | aligned better | base better | ties | preference of aligned | judge accuracy on held-out pairs |",
              "|---|---|---|---|---|---|"]
    for judge in ("reward", "rails"):
        if judge not in rows[0]:
            continue
        win, lose = sum(r[judge] > 0 for r in rows), sum(r[judge] < 0 for r in rows)
        acc = "; ".join(f"{name}: {a[judge + '_right']}/{a['pairs']} ({a[judge + '_right'] / a['pairs']:.0%})"
                        + (f", {a['rails_ties']} ties" if judge == "rails" else "")
                        for name, a in result["accuracy"].items() if judge + "_right" in a)
        lines.append(f"| {judge} | {win} | {lose} | {n - win - lose} | {(win + (n - win - lose) / 2) / n:.0%} | {acc} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--aligned", default="smollm2-aligned")
    parser.add_argument("--reward", default="smollm2-reward", help="registered reward model ('' = the rails only)")
    parser.add_argument("--questions", default=str(QUESTIONS))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reward-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the reward model's dtype")
    parser.add_argument("--pairs-limit", type=int, default=0,
                        help="pairs taken from each --pairs-from file, spread evenly (0 = all)")
    parser.add_argument("--limit", type=int, default=0, help="questions, spread evenly (0 = all)")
    parser.add_argument("--quick", action="store_true", help="--limit 12")
    parser.add_argument("--pairs", nargs="*", default=[str(PAIRS)], help="held-out pairs files for the judges")
    parser.add_argument("--pairs-from", nargs="*", default=[], metavar="JSON",
                        help="benchmarks/alignment.py --out files whose first model's answers make held-out pairs")
    parser.add_argument("--out", default="", help="write every answer, score and verdict here (JSON)")
    parser.add_argument("--report", default="", metavar="JSON", help="re-print an --out file, measuring nothing")
    args = parser.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    if args.max_tokens < 1 or args.limit < 0 or args.pairs_limit < 0:
        raise SystemExit("--max-tokens must be >= 1, --limit and --pairs-limit >= 0")
    for path in args.pairs + args.pairs_from:
        if not Path(path).is_file():
            raise SystemExit(f"{path} not found")
    for name in (args.base, args.aligned):
        Registry().get(name)  # a missing model fails before any work
    rm = load_reward_model(args.reward).to(getattr(torch, args.reward_dtype)) if args.reward else None
    torch.set_flush_denormal(True)
    system = [{"role": "system", "content": system_prompt(load_constitution())}]
    asked = questions(Path(args.questions), 12 if args.quick else args.limit)
    prompts = [[*system, {"role": "user", "content": q}] for q in asked]
    start = time.perf_counter()
    aligned, base = answers(args.aligned, prompts, args.max_tokens), answers(args.base, prompts, args.max_tokens)
    print(f"answered {len(prompts)} questions with both models in {time.perf_counter() - start:.0f} s; judging ...",
          flush=True)
    labelled = {Path(p).name: load_pairs(p) for p in args.pairs}
    labelled |= {f"from {Path(p).name}": pairs_from(Path(p), args.pairs_limit) for p in args.pairs_from}
    with torch.no_grad():
        result = {"aligned": args.aligned, "base": args.base, "reward_model": args.reward,
                  "reward_dtype": args.reward_dtype,
                  "rows": compare(prompts, aligned, base, rm),
                  "accuracy": {name: judge_accuracy(pairs, rm) for name, pairs in labelled.items() if pairs},
                  "seconds": round(time.perf_counter() - start, 1)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(report(result))


if __name__ == "__main__":
    main()
