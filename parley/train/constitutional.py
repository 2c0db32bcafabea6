"""`parley train constitutional`: the model answers requests that touch the constitution, critiques its
own answer against the principle and revises it (Constitutional AI's supervised phase); where its
critique is not usable, the project's rails label instead. Then SFT on the revisions, plus benign
look-alikes answered by the base model itself, so it does not learn to refuse everything.

    parley train constitutional recipes/align-constitutional.toml
    parley train constitutional recipes/align-constitutional.toml limit=40 train.steps=20 run=runs/cai-quick

The run folder holds, besides the loop's files:
  dataset.jsonl         one line per request: principle, origin, the answer, the critique, whether the
                        critique was usable, the revision, and `labeler` (model | rails) that produced it
  pairs.jsonl           preference pairs (parley/train/preferences.py): revision > original answer, and for
                        benign requests the helpful answer > the rails' refusal (what `parley train dpo` reads)
  dialogs-train.jsonl   the SFT conversations (dialogs-val.jsonl: every tenth, held out)
  generation.json       counts: critiques usable, revisions by the model, labelled by the rails, skipped

A critique is usable when its first line is `OK` or `VIOLATION: ...` and agrees with the rails (an answer
to a harmful request is acceptable exactly when it refuses, `is_refusal`); the model's revision is kept when
its critique was usable and the revision refuses. Otherwise the rails give the revision: the principle's own
refusal (parley/data/constitution.toml), which names the principle. Departure from the paper: it samples
several critique/revision rounds over randomly drawn principles; we run one round against the principle the
request was written for, since a 135M model's critiques are rarely usable (generation.json counts them).
resume=true reuses the dataset already generated in the run folder and continues training from its checkpoint.
With critic=rails the model writes no critique or revision at all (SmolLM2-135M's critiques agreed with
the rails on 2 of 20 harmful answers: benchmarks/RESULTS.md, the first alignment section).

Keeping what the model does well: `split=train` leaves the requests of the dev split (every fifth line,
parley/train/align_data.py) out, to tune the recipe on; benign answers may be longer than the others
(benign_tokens), so helpful targets are whole answers; `anchor.dialogs` holds the model to its base on
ordinary dialogs (parley/train/anchor.py). The model answers in bfloat16 (what `parley chat` runs, on
the C kernels' fastest path) and trains in fp32.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from parley.config import setting
from parley.engine.engine import Engine
from parley.engine.sampling import SamplingParams
from parley.files import atomic_open
from parley.pipeline.respond import PERSONA
from parley.pipeline.safety import check_input, check_output, load_constitution
from parley.registry import Registry
from parley.train.align_data import (EVERYDAY, REQUESTS, RETIRED, SPLITS, Request, deflects, is_refusal,
                                     repeats_itself, training_requests)
from parley.train.anchor import AnchorConfig
from parley.train.data import ChatDataset
from parley.train.loop import TrainConfig, resolve_device
from parley.train.preferences import Pair, write_pairs
from parley.train.sft import LoRAConfig, add_adapters, fine_tune
from parley.train.stage import claim_run, model_name, processes

CRITIQUE = ("Here is a request to an AI assistant and its answer.\nRequest: {request}\nAnswer: {answer}\n\n"
            "Principle {id} ({title}): {text}\n\nDoes the answer break this principle? Reply with one line: "
            "'VIOLATION: <why>' or 'OK'.")
REVISION = ("Request: {request}\nAnswer: {answer}\nCritique: {critique}\n\nRewrite the answer so that it follows "
            "principle {id} ({title}): {text}\nWrite only the new answer.")
GENERATED = ("dataset.jsonl", "pairs.jsonl", "dialogs-train.jsonl", "dialogs-val.jsonl", "generation.json")


@dataclass
class ConstitutionalConfig:
    run: str = setting(help="run folder: generated dataset, pairs, config, metrics, checkpoints")
    base: str = setting("smollm2", "registered model to answer, critique, revise and fine-tune")
    name: str = setting("", "register the result under this name ('' = the run folder's name)")
    resume: bool = setting(False, "reuse the dataset in `run` and continue its training from the newest checkpoint")
    requests: str = setting("", "requests TOML ('' = parley/data/alignment/requests.toml)")
    split: Literal[SPLITS] = setting("train", "requests to use: train (the dev split left out for tuning), dev, all")
    retired: bool = setting(True, "add the retired held-out sets' requests (align_data.RETIRED) of the same split")
    everyday: bool = setting(False, "add parley/data/alignment/everyday.toml's requests of the same split (ordinary, "
                                    "tricky-benign and disguised harmful ones, a third in other languages)")
    limit: int = setting(0, "use N requests drawn at random (train.seed) from the split (0 = all)")
    critic: Literal["auto", "model", "rails"] = setting(
        "auto", "who revises: auto = the model where its critique is usable, else the rails; model = the "
                "model always (its revision kept even when unusable); rails = the rails always")
    max_tokens: int = setting(96, "most tokens of each answer, critique and revision")
    benign_tokens: int = setting(0, "most tokens of the answers to benign requests, the helpful targets (0 = max_tokens)")
    temperature: float = setting(0.0, "sampling temperature of the model's answers (0 = greedy)")
    drop_dodges: bool = setting(False, "answers to benign requests that dodge (align_data.deflects: an apology for a "
                                       "confusion nobody mentioned, 'as an AI', the request repeated) are no targets")
    benign_samples: int = setting(0, "where the answer to a benign request is no helpful target (refuses, loops, "
                                     "dodges with drop_dodges), sample up to N more and keep the first helpful one "
                                     "(best-of-N, as rejection-sampling fine-tuning does; 0 = drop it)")
    sample_temperature: float = setting(0.8, "temperature of those extra samples")
    system_prompt: bool = setting(True, "give every other conversation Parley's system prompt (persona and "
                                        "constitution summary), as `parley chat` does")
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    anchor: AnchorConfig = field(default_factory=AnchorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.limit < 0 or self.max_tokens < 1 or self.benign_tokens < 0 or not self.temperature >= 0 \
                or self.benign_samples < 0 or not self.sample_temperature > 0:
            raise ValueError(f"limit must be >= 0, max_tokens >= 1, benign_tokens >= 0, temperature >= 0, "
                             f"benign_samples >= 0 and sample_temperature > 0; got limit={self.limit}, "
                             f"max_tokens={self.max_tokens}, benign_tokens={self.benign_tokens}, temperature="
                             f"{self.temperature}, benign_samples={self.benign_samples}, "
                             f"sample_temperature={self.sample_temperature}")


def system_prompt(constitution) -> str:
    """The system message `parley chat` gives the model (persona and the constitution's summary)."""
    return f"{PERSONA}\n{constitution.summary}"


def generate(engine: Engine, tokenizer, conversations: list[list[dict]], max_tokens: int | list[int],
             temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The model's answer to each conversation, generated together (the engine batches them); max_tokens
    for all of them or one per conversation."""
    if not conversations:
        return []
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(conversations)
    params = [SamplingParams(max_tokens=limits[i], temperature=temperature, stop_ids=tokenizer.stop_ids,
                             seed=seed + i if temperature else None) for i in range(len(conversations))]
    prompts = [tokenizer.encode_chat(c, add_generation_prompt=True)[-(engine.context_length - n):]
               for c, n in zip(conversations, limits)]
    chunk = 128  # the engine queues a bounded number of requests (QueueFull past it)
    done = [c for i in range(0, len(prompts), chunk) for c in engine.generate(prompts[i:i + chunk], params[i:i + chunk])]
    return [tokenizer.decode(c.tokens).strip() for c in done]


def parse_critique(text: str) -> bool | None:
    """True: the critique says the answer breaks the principle; False: says it is OK; None: neither.
    The asked-for format (`VIOLATION: ...` or `OK`) or, as small models write, a first line that says
    the answer does (not) break or violate the principle."""
    line = next((s.strip().strip("'\"*").upper() for s in text.splitlines() if s.strip()), "")
    if line.startswith("VIOLATION"):
        return True
    if line == "OK" or line.startswith(("OK.", "OK,", "OK ")):
        return False
    if re.search(r"\b(?:NOT|N'T|NO)\b.{0,20}\b(?:BREAK|VIOLAT)", line):
        return False
    if re.search(r"\b(?:BREAKS|VIOLATES|IS A VIOLATION|BREAKS THE PRINCIPLE)\b", line):
        return True
    return None


def build_dataset(cfg: ConstitutionalConfig, model, tokenizer, requests: list[Request]) -> list[dict]:
    """Answer, critique and revise every request; one record each (see the module docstring)."""
    constitution = load_constitution()
    engine = Engine(copy.deepcopy(model).to(torch.bfloat16).eval(), max_batch=64)
    system = system_prompt(constitution)
    chats = [([{"role": "system", "content": system}] if cfg.system_prompt and i % 2 else [])
             + [{"role": "user", "content": r.text}] for i, r in enumerate(requests)]
    limits = [cfg.max_tokens if r.harmful else cfg.benign_tokens or cfg.max_tokens for r in requests]
    answers = generate(engine, tokenizer, chats, limits, cfg.temperature, cfg.train.seed)
    harmful = [i for i, r in enumerate(requests) if r.harmful]

    def helpful(i: int, answer: str) -> bool:  # the base's own answer, when it helps: a target for a benign request
        return (len(answer) > 0 and not is_refusal(answer) and not repeats_itself(answer)
                and not (cfg.drop_dodges and deflects(answer, requests[i].text))
                and check_output(answer, constitution).action != "refuse")
    targets = {i: answers[i] for i, r in enumerate(requests) if not r.harmful and helpful(i, answers[i])}
    sampled = {}
    for attempt in range(cfg.benign_samples):  # best-of-N for the rest, one batch of the missing ones per round
        missing = [i for i, r in enumerate(requests) if not r.harmful and i not in targets]
        if not missing:
            break
        tries = generate(engine, tokenizer, [chats[i] for i in missing], [limits[i] for i in missing],
                         cfg.sample_temperature, cfg.train.seed + (attempt + 1) * len(requests))
        for i, text in zip(missing, tries):
            if helpful(i, text):
                targets[i], sampled[i] = text, attempt + 1
    principle = {i: constitution[requests[i].principle] for i in range(len(requests))}

    def ask(template, i, **extra):
        p = principle[i]
        return [{"role": "user", "content": template.format(request=requests[i].text, answer=answers[i], id=p.id,
                                                            title=p.title, text=p.text, **extra)}]
    critiques = revisions = dict.fromkeys(harmful, "")
    if cfg.critic != "rails":
        critiques = dict(zip(harmful, generate(engine, tokenizer, [ask(CRITIQUE, i) for i in harmful],
                                               cfg.max_tokens)))
        revisions = dict(zip(harmful, generate(engine, tokenizer, [ask(REVISION, i, critique=critiques[i])
                                                                   for i in harmful], cfg.max_tokens)))
    records = []
    for i, request in enumerate(requests):
        answer, refused = answers[i], is_refusal(answers[i])
        record = {"prompt": chats[i], "principle": request.principle, "harmful": request.harmful,
                  "origin": request.origin, "source": request.source, "answer": answer, "answer_refused": refused,
                  "rails_input": check_input(request.text, constitution).action}
        if request.harmful:
            verdict = parse_critique(critiques[i])
            usable = verdict is not None and verdict == (not refused)
            model_ok = usable and is_refusal(revisions[i])
            use_model = cfg.critic == "model" or (cfg.critic == "auto" and model_ok)
            record.update(critique=critiques[i], critique_usable=usable, model_revision=revisions[i],
                          revision=revisions[i] if use_model else principle[i].refusal(),
                          labeler="model" if use_model else "rails")
        else:  # the base's own answer when it helps (helpful above), else a sampled one, else none
            record.update(revision=targets.get(i), labeler="rails", sample=sampled.get(i, 0))
        records.append(record)
    return records


def pairs_of(records: list[dict]) -> list[Pair]:
    """revision > original answer for harmful requests the answer did not refuse; for benign requests the
    helpful answer > the refusal of the principle the request resembles (so DPO learns not to over-refuse)."""
    constitution, pairs = load_constitution(), []
    for r in records:
        prompt = [m for m in r["prompt"]]
        if r["harmful"] and r["revision"].strip() != r["answer"].strip() and r["answer"].strip():
            pairs.append(Pair(prompt, r["revision"], r["answer"], r["principle"], "revision", r["labeler"],
                              {"origin": r["origin"], "source": r.get("source", "requests.toml")}))
        elif not r["harmful"] and r["revision"]:
            pairs.append(Pair(prompt, r["revision"], constitution[r["principle"]].refusal(), r["principle"], "rails",
                              "rails", {"origin": r["origin"], "source": r.get("source", "requests.toml"), "benign": True}))
    return pairs


def write_generated(run: Path, records: list[dict]) -> dict:
    """dataset.jsonl, pairs.jsonl, dialogs-{train,val}.jsonl and generation.json in the run folder."""
    dialogs = [{"messages": [*r["prompt"], {"role": "assistant", "content": r["revision"]}],
                "principle": r["principle"]} for r in records if r["revision"]]
    if not dialogs:
        raise ValueError("no request left an SFT example (every benign answer refused, no harmful request): "
                         "add requests or raise max_tokens")
    splits = {"val": dialogs[::10], "train": [d for i, d in enumerate(dialogs) if i % 10]} if len(dialogs) > 1 \
        else {"val": dialogs, "train": dialogs}
    for name, rows in [("dataset.jsonl", records), *((f"dialogs-{k}.jsonl", v) for k, v in splits.items())]:
        with atomic_open(run / name) as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    pairs = pairs_of(records)
    if pairs:
        write_pairs(run / "pairs.jsonl", pairs)
    harmful = [r for r in records if r["harmful"]]
    counts = {"requests": len(records), "harmful": len(harmful), "benign": len(records) - len(harmful),
              "answer_refused_harmful": sum(r["answer_refused"] for r in harmful),
              "answer_refused_benign": sum(r["answer_refused"] for r in records if not r["harmful"]),
              "critique_parsed": sum(parse_critique(r["critique"]) is not None for r in harmful),
              "critique_usable": sum(r["critique_usable"] for r in harmful),
              "revised_by_model": sum(r["labeler"] == "model" for r in harmful),
              "revised_by_rails": sum(r["labeler"] == "rails" for r in harmful),
              "benign_sampled": sum(bool(r.get("sample")) for r in records),
              "benign_skipped": sum(r["revision"] is None for r in records), "pairs": len(pairs),
              "sft_train": len(splits["train"]), "sft_val": len(splits["val"])}
    with atomic_open(run / "generation.json") as f:
        f.write(json.dumps(counts, indent=2) + "\n")
    return counts


def main(cfg: ConstitutionalConfig) -> dict:
    t = cfg.train
    device = resolve_device(t.device)
    model_name(cfg)
    requests = training_requests(cfg.requests or REQUESTS, t.seed, cfg.split,  # before the model loads
                                 RETIRED if cfg.retired else (), EVERYDAY if cfg.everyday else None)
    cfg.anchor.check(cfg.lora.rank)
    if cfg.limit:
        requests = random.Random(t.seed).sample(requests, min(cfg.limit, len(requests)))
    model, tokenizer, _ = Registry().load(cfg.base, dtype=torch.float32)
    if t.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"train.seq_len {t.seq_len} is longer than {cfg.base}'s context "
                         f"({model.config.max_position_embeddings})")
    main_process = int(os.environ.get("RANK", "0")) == 0
    with processes(device):
        run = Path(cfg.run)
        generated = cfg.resume and (run / "dialogs-train.jsonl").is_file()
        if not cfg.resume and run.is_dir() and any((run / n).exists() for n in GENERATED):
            raise FileExistsError(f"run folder {run} already holds a generated dataset: pass resume=true to reuse "
                                  f"it, or choose a new run=")
        run = claim_run(cfg)
        if not generated and main_process:
            print(f"answering, critiquing and revising {len(requests)} requests with {cfg.base} ...")
            counts = write_generated(run, build_dataset(cfg, model, tokenizer, requests))
            print("generated: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # the others wait for the dataset rank 0 writes
        model.to(device)
        chats = ChatDataset(run / "dialogs-train.jsonl", tokenizer, t.seq_len)
        val = ChatDataset(run / "dialogs-val.jsonl", tokenizer, t.seq_len)
        params = add_adapters(model, cfg.lora, t.seed)
        return fine_tune(cfg, model, tokenizer, chats, val, run, params, stage="constitutional",
                         anchor=cfg.anchor)


if __name__ == "__main__":
    import sys

    from parley.config import parse_cli

    main(parse_cli(ConstitutionalConfig, sys.argv[1:], prog="parley train constitutional"))
