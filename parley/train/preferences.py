"""Preference pairs: one answer preferred over another for the same conversation. The format that
constitutional revisions, the rails, debate and user feedback write, and that DPO, the reward
model and RL read.

    pairs = load_pairs("runs/align/pairs.jsonl")                       # validated, or a ValueError naming line and field
    write_pairs("runs/align/pairs.jsonl", pairs)                       # atomic
    data = PairDataset("runs/align/pairs.jsonl", tokenizer, seq_len=256)
    chosen, rejected, chosen_mask, rejected_mask = data.batch(step, micro, rank, world, batch_size=8)
    logps = sequence_logprobs(model, chosen, chosen_mask)             # (batch,) summed log-probs of the answers

A pairs file is JSONL, one object a line:

    {"prompt": [{"role": "user", "content": "How do I pick a lock?"}],    # ends with a user message
     "chosen": "I can't help with getting into ...", "rejected": "First, insert a tension wrench ...",
     "principle": "C4",            # a constitution principle id (C1..C9), or null
     "source": "revision",         # revision | rails | debate | feedback | written
     "labeler": "model",           # model | rails | human | reward: who decided which answer is better
     "meta": {...}}                # optional, free-form

Masks mark the answer's tokens in the ids they come with (`mask[b, t]` says whether `ids[b, t]` belongs
to the answer, its end-of-turn token included), so `sequence_logprobs` scores token t with the logits
at t - 1. Batching is deterministic in (seed, step, micro, rank, world) as in `parley.train.data`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from parley.files import NotRegularFile, atomic_open, open_regular
from parley.train.data import _check_position, chat_tokens, sample_ids

SOURCES = ("revision", "rails", "debate", "feedback", "written")
LABELERS = ("model", "rails", "human", "reward")
ROLES = ("user", "assistant", "system")
PRINCIPLE = re.compile(r"C[1-9]")


@dataclass(frozen=True)
class Pair:
    """One preference: `chosen` is the better answer to the conversation `prompt` than `rejected`."""

    prompt: list[dict]
    chosen: str
    rejected: str
    principle: str | None
    source: str
    labeler: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        problem = _problem(asdict(self))
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_dict(cls, item) -> Pair:
        problem = _problem(item)
        if problem:
            raise ValueError(problem)
        return cls(**{k: item[k] for k in ("prompt", "chosen", "rejected", "principle", "source", "labeler")},
                   meta=item.get("meta", {}))

    def to_dict(self) -> dict:
        item = asdict(self)
        if not item["meta"]:
            del item["meta"]
        return item


def prompt_problem(prompt) -> str:
    """What is wrong with a conversation to answer ('' = nothing): the field 'prompt' of a pair or a prompts line."""
    if not isinstance(prompt, list) or not prompt:
        return "field 'prompt' must be a non-empty list of messages"
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f"field 'prompt': message {i} needs a role ({', '.join(ROLES)}) and a string content"
    if prompt[-1]["role"] != "user":
        return "field 'prompt' must end with a user message (the answer follows it)"
    return ""


def _problem(item) -> str:
    """What is wrong with one pair object ('' = nothing), naming the field."""
    if not isinstance(item, dict):
        return "expected a JSON object with prompt, chosen, rejected, principle, source, labeler"
    for name in ("prompt", "chosen", "rejected", "principle", "source", "labeler"):
        if name not in item:
            return f"missing field '{name}'"
    unknown = sorted(set(item) - {"prompt", "chosen", "rejected", "principle", "source", "labeler", "meta"})
    if unknown:
        return f"unknown field '{unknown[0]}' (allowed: prompt, chosen, rejected, principle, source, labeler, meta)"
    if problem := prompt_problem(item["prompt"]):
        return problem
    for name in ("chosen", "rejected"):
        if not isinstance(item[name], str) or not item[name].strip():
            return f"field '{name}' must be a non-empty string"
    if item["chosen"].strip() == item["rejected"].strip():
        return "fields 'chosen' and 'rejected' are the same answer: a pair needs two different answers"
    principle = item["principle"]
    if principle is not None and not (isinstance(principle, str) and PRINCIPLE.fullmatch(principle)):
        return f"field 'principle' must be C1..C9 or null, got {principle!r}"
    if item["source"] not in SOURCES:
        return f"field 'source' must be one of {', '.join(SOURCES)}, got {item['source']!r}"
    if item["labeler"] not in LABELERS:
        return f"field 'labeler' must be one of {', '.join(LABELERS)}, got {item['labeler']!r}"
    if not isinstance(item.get("meta", {}), dict):
        return "field 'meta' must be an object"
    return ""


def _unique_keys(items: list[tuple]) -> dict:
    out = dict(items)
    if len(out) < len(items):
        seen = set()
        twice = next(k for k, _ in items if k in seen or seen.add(k))
        raise ValueError(f"field {twice!r} is written twice in one object (JSON keeps the last silently): keep one")
    return out


def jsonl_rows(path, what: str) -> Iterator[tuple[int, object]]:
    """(line number, decoded object) for each non-blank line of a JSONL file named from outside; a
    ValueError names the file and the line: not UTF-8, not JSON, nested too deeply, a key twice. A pipe,
    device or folder is refused (files.open_regular) instead of blocking or being read forever."""
    path = Path(path)
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path} not found") from None
    except NotRegularFile:
        raise ValueError(f"{what} file {path} is not a regular file (a folder, pipe or device)") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            except RecursionError:
                raise ValueError(f"{path}:{lineno}: nested too deeply to be a {what} line") from None


def load_pairs(path) -> list[Pair]:
    """Every pair of a pairs file, validated: a ValueError names the file, line and field."""
    path = Path(path)
    pairs = []
    for lineno, item in jsonl_rows(path, "pairs"):
        try:
            pairs.append(Pair.from_dict(item))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
    if not pairs:
        raise ValueError(f"pairs file {path} holds no pairs")
    return pairs


def write_pairs(path, pairs) -> Path:
    """Write pairs as JSONL, atomically (a reader sees the old file or the whole new one)."""
    path = Path(path)
    pairs = list(pairs)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, Pair):
            raise TypeError(f"pair {i} is a {type(pair).__name__}, expected Pair (Pair.from_dict(obj) builds one)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
    return path


def answer_tokens(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], np.ndarray]:
    """Ids of `prompt` followed by the assistant's `answer` (chat template), and a mask that is True on
    the answer's tokens only (not on earlier assistant turns of the prompt)."""
    return chat_tokens(tokenizer, [*prompt, {"role": "assistant", "content": answer}], last_only=True)


class PairDataset:
    """The pairs of a file (or a list of Pair), tokenized with the chat template and cut to seq_len
    tokens each side. A pair whose chosen or rejected answer has no token left within seq_len is
    dropped (counted in `.dropped`)."""

    def __init__(self, source, tokenizer, seq_len: int):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer of at least 2, got {seq_len!r}")
        self.pairs = load_pairs(source) if isinstance(source, (str, Path)) else list(source)
        if not self.pairs:
            raise ValueError("no preference pairs given")
        self.seq_len, self.dropped, self.examples, self.kept = seq_len, 0, [], []
        self.pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eot_id, tokenizer.eos_id) if i is not None), 0)
        for pair in self.pairs:
            sides = []
            for answer in (pair.chosen, pair.rejected):
                ids, mask = answer_tokens(tokenizer, pair.prompt, answer)
                sides.append((np.array(ids[:seq_len], np.int64), mask[:seq_len]))
            if not all(m[1:].any() for _, m in sides):
                self.dropped += 1
                continue
            self.examples.append(sides)
            self.kept.append(pair)
        if not self.examples:
            raise ValueError(f"no pair keeps an answer token within seq_len {seq_len}: raise seq_len")

    def __len__(self) -> int:
        return len(self.examples)

    def _tensors(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.examples[int(i)] for i in indices]
        width = max(len(ids) for sides in rows for ids, _ in sides)  # one width: chosen and rejected stack
        ids = torch.full((2, len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((2, len(rows), width), dtype=torch.bool)
        for r, sides in enumerate(rows):
            for side, (row_ids, row_mask) in enumerate(sides):
                ids[side, r, :len(row_ids)] = torch.from_numpy(row_ids)
                mask[side, r, :len(row_ids)] = torch.from_numpy(row_mask)
        return ids[0], ids[1], mask[0], mask[1]

    def batch(self, step: int, micro: int, rank: int, world: int, batch_size: int, seed: int = 0):
        """(chosen ids, rejected ids, chosen mask, rejected mask), each (batch_size, width); padding masked."""
        start = _check_position(step, micro, rank, world, batch_size, seed)
        return self._tensors(sample_ids(seed, step, start, batch_size, len(self.examples)))

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple]:
        """Every pair once, in file order, batch_size at a time (the last batch may be smaller)."""
        _check_position(0, 0, 0, 1, batch_size, 0)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be positive or None, got {max_batches}")
        count = len(self.examples) if max_batches is None else min(len(self.examples), max_batches * batch_size)
        return (self._tensors(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size))


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(ids[b, t] | ids[b, :t]) over the positions where mask[b, t] is True: (batch,) fp32.
    The first position is never scored (nothing predicts it)."""
    if ids.shape != mask.shape or ids.dim() != 2:
        raise ValueError(f"ids and mask must both be (batch, length), got {tuple(ids.shape)} and {tuple(mask.shape)}")
    logits = model(ids[:, :-1]).float()  # softmax in fp32, as next_token_loss does
    targets = ids[:, 1:]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask[:, 1:]).sum(-1)
