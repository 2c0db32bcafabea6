"""Preference pairs labelled by the rails: for a harmful request, the constitution's refusal is
chosen over the model's own (compliant) answer; for a benign look-alike, the model's own answer is
chosen over a refusal. Prompts are the guard's training requests (parley/data/guard/requests.toml);
every fifth request of each list goes to the held-out file, never to training.

    python -m parley.train.rail_pairs out=benchmarks/data/reward_pairs model=smollm2 max_tokens=48

Pairs whose model answer reads as a refusal already (a harmful request the model refuses on its
own, a benign one it refuses wrongly) are skipped and counted: they would teach nothing or the
opposite. The model's answers to C6 requests (sexual content involving minors) are never
generated or stored.

The rails also judge a pair they did not write (`rails_prefer`, benchmarks/preference.py): for a request
their input rules refuse, the answer that declines wins; otherwise the answer that neither declines nor
trips an output rule wins; when both answers are alike in that respect the rails have no preference (0).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from parley.config import setting
from parley.pipeline.safety import check_output, default_path, load_constitution
from parley.train.preferences import Pair, write_pairs

REQUESTS = default_path().parent / "guard" / "requests.toml"
SKIPPED_PRINCIPLES = ("C6",)
_REFUSAL = re.compile(r"\b(I can(?:'|no)?t (?:help|assist|provide|do|share|give|write|answer)|I cannot|I won'?t|"
                      r"I'?m (?:sorry|unable|not able)|I am (?:sorry|unable|not able)|as an AI,? I)", re.I)


def looks_like_refusal(text: str) -> bool:
    """Whether an answer declines (the rails' refusals, and the usual ways a model says no)."""
    return bool(_REFUSAL.search(text))


def requests(path: Path = REQUESTS) -> list[dict]:
    """Every request of the guard's file: {"text", "principle", "harmful", "heldout"}."""
    rows = []
    for entry in tomllib.loads(path.read_text(encoding="utf-8"))["principle"]:
        for kind in ("harmful", "benign"):
            for i, text in enumerate(entry[kind]):
                if kind == "harmful" and entry["id"] in SKIPPED_PRINCIPLES:
                    continue
                rows.append({"text": text, "principle": entry["id"], "harmful": kind == "harmful",
                             "heldout": i % 5 == 4})
    return rows


def build_pairs(rows: list[dict], answers: list[str]) -> tuple[list[Pair], dict]:
    """Pairs from requests and the model's answer to each, and counts of what was skipped."""
    constitution = load_constitution()
    pairs, skipped = [], {"model refused a harmful request": 0, "model refused a benign request": 0,
                          "rails flag the answer to a benign request": 0}
    for row, answer in zip(rows, answers, strict=True):
        refusal, prompt = constitution[row["principle"]].refusal(), [{"role": "user", "content": row["text"]}]
        meta = {"heldout": row["heldout"], "kind": "harmful" if row["harmful"] else "benign"}
        if looks_like_refusal(answer) or not answer.strip():
            skipped[f"model refused a {meta['kind']} request"] += 1
        elif row["harmful"]:
            pairs.append(Pair(prompt, refusal, answer, row["principle"], "rails", "rails", meta))
        elif check_output(answer, constitution).action == "refuse":
            skipped["rails flag the answer to a benign request"] += 1
        else:
            pairs.append(Pair(prompt, answer, refusal, row["principle"], "rails", "rails", meta))
    return pairs, skipped


def rails_prefer(prompt: list[dict], first: str, second: str, constitution=None) -> int:
    """+1 when the rails prefer `first` to `second` as the answer to `prompt`'s last user message, -1 for
    `second`, 0 for no preference (see the module docstring). Declining is `is_refusal` (the alignment
    benchmark's rule) or `looks_like_refusal`; the rails' input and output rules, no guard model."""
    from parley.pipeline.safety import check_input
    from parley.train.align_data import is_refusal

    constitution = constitution or load_constitution()
    request = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    harmful = check_input(request, constitution).action == "refuse"

    def good(answer: str) -> bool:
        declines = is_refusal(answer) or looks_like_refusal(answer)
        if harmful:
            return declines
        return bool(answer.strip()) and not declines and check_output(answer, constitution).action != "refuse"
    return int(good(first)) - int(good(second))


@dataclass
class RailPairsConfig:
    out: str = setting(help="folder to write train.jsonl and heldout.jsonl into")
    model: str = setting("smollm2", "registered model whose own answers are paired with the rails' refusals")
    max_tokens: int = setting(48, "longest model answer, in tokens")


def main(cfg: RailPairsConfig) -> dict:
    from parley.engine.engine import Engine
    from parley.engine.sampling import SamplingParams
    from parley.registry import Registry

    rows = requests()
    model, tokenizer, _ = Registry().load(cfg.model, dtype=torch.bfloat16)
    engine = Engine(model, max_batch=32, max_waiting=len(rows))
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r["text"]}]) for r in rows]
    answers = [tokenizer.decode(c.tokens).strip() for c in engine.generate(prompts, params)]
    pairs, skipped = build_pairs(rows, answers)
    out = Path(cfg.out)
    for split, held in (("train", False), ("heldout", True)):
        write_pairs(out / f"{split}.jsonl", [p for p in pairs if p.meta["heldout"] == held])
    counts = {"train": sum(not p.meta["heldout"] for p in pairs), "heldout": sum(p.meta["heldout"] for p in pairs),
              "skipped": skipped}
    print(f"{counts['train']} training and {counts['heldout']} held-out pairs in {out}; skipped: {skipped}")
    return counts


if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(RailPairsConfig, sys.argv[1:], prog="python -m parley.train.rail_pairs"))
