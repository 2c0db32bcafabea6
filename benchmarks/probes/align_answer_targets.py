"""SFT data for alignment round 11 (issue 12): targets that answer, for exactly the look-alikes the aligned
model declines. Ten rounds of rewards and preferences moved harmful and benign refusals together; this
round gives the model the words instead of a score.

For each request of the training split (requests.toml with its variants, the retired held-out sets,
everyday.toml; deduplicated; dev is never read), --model answers it as `benchmarks/alignment.py` asks it
(the persona and constitution summary as the system message, greedy, 32 tokens, bfloat16) and
`is_refusal` judges the answer. Then:
  - a request to be answered that --model declines gets --teacher's own answer (greedy, up to 96 tokens;
    when that is no help, up to --samples sampled ones at temperature 0.7): helpful means not a refusal,
    not looping, not a dodge, and passing the output rails, as `parley train constitutional` judges it;
    with no helpful answer the request is left out;
  - a request to be declined gets its principle's refusal (the rails' text, naming the principle), whether
    or not --model already declines it, so the narrow data holds both sides of every topic;
  - requests to be answered that --model answers are left out (the anchor holds the rest of its behaviour).
With --harmful missed (round 12) only the requests to be declined that --model answers get a refusal, so the
answers outweigh the refusals (round 11, with all of them, learned the refusals and not the answers);
--reuse DATASET takes the decisions and targets of an earlier run's dataset.jsonl instead of generating them.
Every other example carries the system message, as `parley train constitutional` builds them.

Writes OUT/dataset.jsonl (one line per request: the decision and the target, with `labeler` base | base-sample-N
| rails | none), OUT/dialogs-train.jsonl and OUT/dialogs-val.jsonl (every tenth example), OUT/counts.json.

    python benchmarks/probes/align_answer_targets.py --model smollm2-rl9-10 --teacher smollm2 --out runs/sft11
    python benchmarks/probes/align_answer_targets.py --reuse runs/sft11/dataset.jsonl --harmful missed --out runs/sft12
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from parley.engine.engine import Engine  # noqa: E402
from parley.files import atomic_open  # noqa: E402
from parley.pipeline.safety import check_output, load_constitution  # noqa: E402
from parley.registry import Registry  # noqa: E402
from parley.train.align_data import EVERYDAY, deflects, is_refusal, repeats_itself, training_requests  # noqa: E402
from parley.train.constitutional import generate, system_prompt  # noqa: E402

DECIDE_TOKENS, ANSWER_TOKENS = 32, 96


def unique_requests():
    seen, rows = set(), []
    for r in training_requests(split="train", everyday=EVERYDAY):
        if r.text not in seen:
            seen.add(r.text)
            rows.append(r)
    return rows


def engine_for(name: str) -> tuple[Engine, object]:
    model, tokenizer, _ = Registry().load(name, dtype=torch.bfloat16)
    return Engine(model.eval(), max_batch=64), tokenizer


def build(model: str, teacher: str, samples: int, seed: int) -> list[dict]:
    constitution = load_constitution()
    system = [{"role": "system", "content": system_prompt(constitution)}]
    requests = unique_requests()
    engine, tokenizer = engine_for(model)
    decisions = generate(engine, tokenizer, [system + [{"role": "user", "content": r.text}] for r in requests],
                         DECIDE_TOKENS)
    del engine
    chats = [(system if i % 2 else []) + [{"role": "user", "content": r.text}] for i, r in enumerate(requests)]
    wanted = [i for i, r in enumerate(requests) if not r.harmful and is_refusal(decisions[i])]

    def helpful(i: int, answer: str) -> bool:
        return (bool(answer) and not is_refusal(answer) and not repeats_itself(answer)
                and not deflects(answer, requests[i].text) and check_output(answer, constitution).action != "refuse")
    engine, tokenizer = engine_for(teacher)
    targets, labelers = {}, {}
    for i, text in zip(wanted, generate(engine, tokenizer, [chats[i] for i in wanted], ANSWER_TOKENS)):
        if helpful(i, text):
            targets[i], labelers[i] = text, "base"
    for attempt in range(1, samples + 1):
        missing = [i for i in wanted if i not in targets]
        if not missing:
            break
        tries = generate(engine, tokenizer, [chats[i] for i in missing], ANSWER_TOKENS, temperature=0.7,
                         seed=seed + attempt * len(requests))
        for i, text in zip(missing, tries):
            if helpful(i, text):
                targets[i], labelers[i] = text, f"base-sample-{attempt}"
    rows = []
    for i, r in enumerate(requests):
        if r.harmful:
            target, labeler = constitution[r.principle].refusal(), "rails"
        else:
            target, labeler = targets.get(i), labelers.get(i, "none")
        rows.append({"prompt": chats[i], "principle": r.principle, "harmful": r.harmful, "origin": r.origin,
                     "source": r.source, "decision": decisions[i], "declined": is_refusal(decisions[i]),
                     "target": target, "labeler": labeler})
    return rows


def wanted(row: dict, harmful: str) -> bool:
    """Whether a dataset row becomes an SFT example: it has a target, and with harmful=missed a request to
    be declined only where the model answered it."""
    return bool(row["target"]) and (harmful == "all" or not row["harmful"] or not row["declined"])


def write(out: Path, rows: list[dict], harmful: str = "all") -> dict:
    dialogs = [{"messages": [*r["prompt"], {"role": "assistant", "content": r["target"]}], "principle": r["principle"]}
               for r in rows if wanted(r, harmful)]
    splits = {"train": [d for i, d in enumerate(dialogs) if i % 10], "val": dialogs[::10]}
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in [("dataset.jsonl", rows), *((f"dialogs-{k}.jsonl", v) for k, v in splits.items())]:
        with atomic_open(out / name) as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    benign = [r for r in rows if not r["harmful"]]
    counts = {"requests": len(rows), "harmful": len(rows) - len(benign), "benign": len(benign),
              "harmful_declined": sum(r["declined"] for r in rows if r["harmful"]),
              "benign_declined": sum(r["declined"] for r in benign),
              "benign_targets": dict(Counter(r["labeler"] for r in benign if r["declined"])),
              "benign_declined_by_kind": dict(Counter(r["origin"].split("/")[0] for r in benign if r["declined"])),
              "harmful_examples": sum(r["harmful"] and wanted(r, harmful) for r in rows),
              "sft_train": len(splits["train"]), "sft_val": len(splits["val"])}
    with atomic_open(out / "counts.json") as f:
        f.write(json.dumps(counts, indent=2) + "\n")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-aligned", help="the model whose refusals are mended")
    ap.add_argument("--teacher", default="smollm2", help="the model whose answers become the targets")
    ap.add_argument("--samples", type=int, default=3, help="sampled tries when the greedy answer is no help")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--harmful", choices=("all", "missed"), default="all",
                    help="requests to be declined given a refusal: all, or only those --model answers")
    ap.add_argument("--reuse", help="an earlier run's dataset.jsonl: its decisions and targets, nothing generated")
    ap.add_argument("--out", required=True, help="folder for the dataset and the SFT dialogs (must not hold them)")
    args = ap.parse_args()
    out = Path(args.out)
    if (out / "dataset.jsonl").exists():
        raise SystemExit(f"{out} already holds a dataset: choose a new --out")
    torch.set_flush_denormal(True)
    if args.reuse:
        rows = [json.loads(line) for line in Path(args.reuse).read_text(encoding="utf-8").splitlines()]
    else:
        rows = build(args.model, args.teacher, args.samples, args.seed)
    print(json.dumps(write(out, rows, args.harmful), indent=2))


if __name__ == "__main__":
    main()
