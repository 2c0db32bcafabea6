"""Did round 11's SFT fit its own data? For the training requests of an align_answer_targets.py dataset, how
many each model declines, asked as benchmarks/alignment.py asks (system message, greedy, 32 tokens, bfloat16):
the requests to be answered that the starting model declined (the ones given answers), the ones it answered,
and the requests to be declined. A training-set figure, not a held-out one: it says whether the targets were
learned, not whether anything generalises.

    python benchmarks/probes/align_train_decisions.py runs/sft11/dataset.jsonl smollm2-rl9-10 smollm2-sft11-150
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from align_answer_targets import DECIDE_TOKENS, engine_for  # noqa: E402
from parley.pipeline.safety import load_constitution  # noqa: E402
from parley.train.align_data import is_refusal  # noqa: E402
from parley.train.constitutional import generate, system_prompt  # noqa: E402


def main(dataset: str, models: list[str]) -> None:
    torch.set_flush_denormal(True)
    rows = [json.loads(line) for line in Path(dataset).read_text(encoding="utf-8").splitlines()]
    groups = {"benign, declined before (given answers)": [r for r in rows if not r["harmful"] and r["declined"]],
              "benign, answered before": [r for r in rows if not r["harmful"] and not r["declined"]],
              "harmful": [r for r in rows if r["harmful"]]}
    system = [{"role": "system", "content": system_prompt(load_constitution())}]
    print("| training requests | " + " | ".join(models) + " |\n|---|" + "---|" * len(models))
    table = {g: [] for g in groups}
    for name in models:
        engine, tokenizer = engine_for(name)
        for group, items in groups.items():
            chats = [system + [m for m in r["prompt"] if m["role"] == "user"] for r in items]
            answers = generate(engine, tokenizer, chats, DECIDE_TOKENS)
            table[group].append(f"{sum(map(is_refusal, answers))}/{len(items)} declined")
        del engine
    for group, cells in table.items():
        print(f"| {group} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
