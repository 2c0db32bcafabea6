"""What the training loop reads: token windows for pretraining, masked conversations for SFT.

    shards = TokenShards(".data/corpus", split="train")           # token shards written by `parley data prepare`
    inputs, targets = shards.batch(step, micro, rank, world, batch_size=8, seq_len=512, seed=0)
    for inputs, targets in TokenShards(folder, "val").eval_batches(8, 512, max_batches=20): ...

    chats = ChatDataset(".data/corpus/dialogs-train.jsonl", tokenizer, seq_len=512)
    inputs, targets, mask = chats.batch(step, micro, rank, world, batch_size=8, seed=0)
    loss = (cross_entropy(logits, targets, reduction="none") * mask).sum() / mask.sum()

Determinism: a batch is a pure function of (seed, step, micro, rank, world, batch_size). Step `step`
has one global sequence of samples g = 0, 1, 2, ... (sample g is a window offset, or a conversation,
drawn by hashing (seed, step, g)); a call returns the batch_size samples starting at
g = (micro * world + rank) * batch_size. So micro-step m of any split covers the same samples,
g in [m * world * batch_size, (m + 1) * world * batch_size): 2 ranks x 4 rows equal 1 rank x 8 rows,
and resuming at a step reproduces the batches exactly. Samples are drawn with replacement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays: a cheap hash whose outputs look independent."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_ids(seed: int, step: int, start: int, count: int, high: int) -> np.ndarray:
    """Samples g = start .. start+count-1 of step `step`: integers in [0, high), fixed by (seed, step, g)."""
    key = _mix(_mix(np.array([seed & _MASK64], np.uint64)) ^ np.uint64(step & _MASK64))
    g = np.arange(start, start + count, dtype=np.uint64)
    return (_mix(key ^ g) % np.uint64(high)).astype(np.int64)  # modulo bias < high / 2**64


def _check_position(step, micro, rank, world, batch_size, seed) -> int:
    for name, value in (("step", step), ("micro", micro), ("rank", rank), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    for name, value in (("world", world), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if rank >= world:
        raise ValueError(f"rank {rank} must be below world {world}")
    return (micro * world + rank) * batch_size


class TokenShards:
    """The token shards of one split (`train` or `val`), memory-mapped and read as one stream."""

    def __init__(self, folder, split: str = "train"):
        folder = Path(folder)
        hint = f"run `parley data prepare {folder} --tokenizer TOKENIZER_FOLDER` first"
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not folder.is_dir():
            raise FileNotFoundError(f"token folder {folder} not found: {hint}")
        manifest = _read_manifest(folder / "manifest.json", hint)
        if "shards" not in manifest or "tokenizer" not in manifest:
            raise ValueError(f"{folder} holds no token shards (prepared without a tokenizer): {hint}")
        self.folder, self.split = folder, split
        self.vocab_size = int(manifest["tokenizer"]["vocab_size"])
        self.eot_id = manifest["tokenizer"].get("eot_id")
        dtype = np.dtype(manifest["tokenizer"]["dtype"])
        self.shards = []
        for shard in manifest["shards"].get(split, []):
            path = folder / shard["file"]
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} is missing: {hint}")
            if path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise ValueError(f"shard {path} holds {path.stat().st_size // dtype.itemsize} tokens, the "
                                 f"manifest says {shard['tokens']}: {hint}")
            if shard["tokens"]:  # np.memmap refuses empty files
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.num_tokens = sum(len(s) for s in self.shards)
        if self.num_tokens == 0:
            raise ValueError(f"the {split} split of {folder} is empty: prepare more text or a larger val_fraction")
        self._starts = np.cumsum([0] + [len(s) for s in self.shards])

    def _window(self, offset: int, length: int) -> np.ndarray:
        """Tokens [offset, offset+length) of the split; a window may span shards."""
        i = int(np.searchsorted(self._starts, offset, side="right")) - 1
        parts, offset = [], offset - self._starts[i]
        while length > 0:
            part = self.shards[i][offset:offset + length]
            parts.append(part)
            length, offset, i = length - len(part), 0, i + 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def check_seq_len(self, seq_len) -> None:
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if seq_len + 1 > self.num_tokens:
            raise ValueError(f"seq_len {seq_len} needs {seq_len + 1} tokens but the {self.split} split has only "
                             f"{self.num_tokens}: use a shorter seq_len or more data")

    def _tensors(self, offsets, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self._window(int(o), seq_len + 1) for o in offsets]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def batch(self, step: int, micro: int, rank: int, world: int, batch_size: int, seq_len: int,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64; targets are inputs shifted by one token."""
        start = _check_position(step, micro, rank, world, batch_size, seed)
        self.check_seq_len(seq_len)
        return self._tensors(sample_ids(seed, step, start, batch_size, self.num_tokens - seq_len), seq_len)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows from the start of the split, batch_size at a time (the last
        batch may be smaller), at most max_batches batches. The same every time."""
        _check_position(0, 0, 0, 1, batch_size, 0)
        self.check_seq_len(seq_len)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be positive or None, got {max_batches}")
        windows = (self.num_tokens - 1) // seq_len
        if max_batches is not None:
            windows = min(windows, max_batches * batch_size)

        def batches():
            for first in range(0, windows, batch_size):
                offsets = range(first * seq_len, min(first + batch_size, windows) * seq_len, seq_len)
                yield self._tensors(offsets, seq_len)
        return batches()


def chat_tokens(tokenizer, messages: list[dict], last_only: bool = False) -> tuple[list[int], np.ndarray]:
    """Ids of a whole conversation (as `tokenizer.encode_chat(messages, add_generation_prompt=False)`) and
    a bool mask that is True on exactly the assistant's content and its end-of-turn token (with
    last_only, on the last message's only: the answer a preference pair compares).

    The template rendered on the messages before an assistant message, with the generation prompt,
    ends where that message's content begins; the first stop token after the content ends the turn.
    So role headers, a system prompt the template adds, and what follows the end-of-turn token (a
    newline in ChatML) stay unmasked whatever the template.
    """
    text = tokenizer.render_chat(messages, add_generation_prompt=False)
    stops = [tokenizer.id_to_token(i) for i in sorted(tokenizer.stop_ids)]
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant" or (last_only and k != len(messages) - 1):
            continue
        if k == 0:
            raise ValueError("the conversation starts with an assistant message; put a user message first")
        start = len(head := tokenizer.render_chat(messages[:k], add_generation_prompt=True))
        if not text.startswith(head):
            raise ValueError("the chat template renders the start of a conversation differently from the whole; "
                             "assistant tokens cannot be located")
        content = message["content"].strip()  # templates may trim it
        after = start if (at := text.find(content, start)) < 0 else at + len(content)
        ends = [i + len(s) for s in stops if (i := text.find(s, after)) >= 0]
        spans.append((start, min(ends, default=after)))
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    starts = np.fromiter((a for a, _ in encoding.offsets), np.int64, len(encoding.offsets))
    mask = np.zeros(len(starts), bool)
    for a, b in spans:  # a token belongs to the turn its first character does
        mask |= (starts >= a) & (starts < b)
    return encoding.ids, mask


class ChatDataset:
    """Conversations of a dialogs JSONL file ({"messages": [{"role", "content"}, ...]} a line), tokenized
    with the tokenizer's chat template, truncated to seq_len + 1 tokens, with a loss mask on the
    assistant's tokens. Conversations left with no assistant token after truncation are dropped
    (counted in `.dropped`)."""

    def __init__(self, jsonl_path, tokenizer, seq_len: int):
        path = Path(jsonl_path)
        if not path.is_file():
            raise FileNotFoundError(f"dialog file {path} not found: run `parley data prepare {path.parent}` first")
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.seq_len, self.dropped, self.examples = seq_len, 0, []
        pad = next((i for i in (tokenizer.pad_id, tokenizer.eot_id, tokenizer.eos_id) if i is not None), 0)
        self.pad_id = pad
        lines = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                lines += 1
                try:
                    ids, mask = chat_tokens(tokenizer, _messages(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
                if not mask[1:].any():  # nothing left to learn from: the answer was cut off
                    self.dropped += 1
                    continue
                self.examples.append((np.array(ids, np.int64), mask))
        if not lines:
            raise ValueError(f"dialog file {path} is empty")
        if not self.examples:
            raise ValueError(f"no conversation in {path} keeps an assistant token within seq_len {seq_len}; "
                             "raise seq_len")

    def __len__(self) -> int:
        return len(self.examples)

    def _tensors(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [self.examples[int(i)] for i in indices]
        width = max(len(ids) - 1 for ids, _ in rows)  # the longest row, not seq_len: short chats cost less
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for row, (ids, m) in enumerate(rows):
            inputs[row, :len(ids) - 1] = torch.from_numpy(ids[:-1])
            targets[row, :len(ids) - 1] = torch.from_numpy(ids[1:])
            mask[row, :len(ids) - 1] = torch.from_numpy(m[1:])  # mask[t] says whether targets[t] counts
        return inputs, targets, mask

    def batch(self, step: int, micro: int, rank: int, world: int, batch_size: int, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, mask), each (batch_size, width): width is the longest row's length (at most
        seq_len), so a batch of short conversations is not padded to seq_len; padding has mask False."""
        start = _check_position(step, micro, rank, world, batch_size, seed)
        return self._tensors(sample_ids(seed, step, start, batch_size, len(self.examples)))

    def eval_batches(self, batch_size: int, max_batches: int | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every conversation once, in file order, batch_size at a time (the last batch may be smaller)."""
        _check_position(0, 0, 0, 1, batch_size, 0)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be positive or None, got {max_batches}")
        count = len(self.examples) if max_batches is None else min(len(self.examples), max_batches * batch_size)
        return (self._tensors(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size))


def _messages(line: str) -> list[dict]:
    """The messages of one JSONL line, or a ValueError that says why not."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    messages = item.get("messages") if isinstance(item, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected {"messages": [{"role": ..., "content": ...}, ...]}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} needs a role (system, user or assistant) and a string content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message to learn from")
    return messages


def _read_manifest(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): {hint}") from None
