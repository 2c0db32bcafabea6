"""A cross-encoder reranker: the question and a passage read together by the MiniLM encoder,
scored by a small trained head (issue 17). No cross-encoder weights can be had offline, so one is
trained here (`parley train reranker`, parley/train/rerank.py), starting from the sentence
encoder of parley/pipeline/embed.py: either a head alone over the frozen encoder, or the head and
a fine-tuned copy of the encoder (the file then holds the encoder's weights too, `encoder.*`).

    reranker = Reranker.load(embedder, "reranker.safetensors")   # written by `parley train reranker`
    scores = reranker.score("how do I sort?", [chunk.text for chunk in hits])   # higher: better

Unlike the embedder, which encodes the question and the passage apart, the encoder here reads
"[CLS] question [SEP] passage [SEP]" in one pass, so attention can match a question's words to
the passage's; the head reads the mean of the last layer's states and the [CLS] state.
`KnowledgeConfig.rerank` (off by default: see benchmarks/RESULTS.md) turns the stage on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from parley.pipeline.embed import PRECISIONS, Embedder, resolve_precision


def default_path() -> Path:
    """Where `parley train reranker --kind head|encoder` writes and `KnowledgeConfig.rerank` reads."""
    from parley.registry import parley_home

    return parley_home() / "reranker.safetensors"


class RerankerError(RuntimeError):
    pass


def pair_features(embedder: Embedder, query: str, texts: list[str], batch_size: int = 16,
                  max_tokens: int | None = None, frozen: int = 0) -> torch.Tensor:
    """(len(texts), 2 * dim): for each passage, the mean and [CLS] states of the encoder's last
    layer over "[CLS] query [SEP] passage [SEP]" (the passage cut to fit the encoder's window, or
    `max_tokens` in all). Differentiable: call it under torch.inference_mode() to score. The
    embeddings and the first `frozen` layers run without gradients (fine-tuning only the top
    layers costs their backward pass alone, and no gradient of the 30,522-row word table)."""
    tok = embedder.tokenizer
    rows_out: list[tuple[list[int], torch.Tensor]] = []
    encodings = [tok.encode(query, text) for text in texts]  # truncation keeps both [SEP]s
    if max_tokens:
        encodings = [_cut(e, max_tokens) for e in encodings]
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        t = max(len(encodings[i].ids) for i in rows)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        types = torch.zeros(len(rows), t, dtype=torch.long)
        keep = torch.zeros(len(rows), t, dtype=torch.bool)
        for r, i in enumerate(rows):
            e = encodings[i]
            ids[r, : len(e.ids)] = torch.tensor(e.ids)
            types[r, : len(e.ids)] = torch.tensor(e.type_ids)
            keep[r, : len(e.ids)] = True
        mask = keep[:, None, None, :]
        with torch.no_grad():
            x = embedder.norm(embedder.words(ids) + embedder.positions(torch.arange(t)) + embedder.types(types))
            for layer in embedder.layers[:frozen]:
                x = layer(x, mask)
        x = x.to(embedder.layers[-1].qkv.weight.dtype)  # the frozen part may compute in bf16, the rest not
        for layer in embedder.layers[frozen:]:
            x = layer(x, mask)
        w = keep.unsqueeze(-1).to(x.dtype)
        rows_out.append((rows, torch.cat([(x * w).sum(1) / w.sum(1), x[:, 0]], dim=-1).float()))
    out = torch.cat([f for _, f in rows_out]) if rows_out else torch.zeros(0, 2 * embedder.dim)
    order = [i for rows, _ in rows_out for i in rows]
    return out[torch.argsort(torch.tensor(order))] if order else out


class _Cut(NamedTuple):
    ids: list[int]
    type_ids: list[int]


def _cut(encoding, max_tokens: int):
    """The pair's encoding cut to `max_tokens`, the passage shortened and its final [SEP] kept."""
    if len(encoding.ids) <= max_tokens:
        return encoding
    keep = max_tokens - 1
    return _Cut(encoding.ids[:keep] + encoding.ids[-1:], encoding.type_ids[:keep] + encoding.type_ids[-1:])


class Reranker:
    """Scores (question, passage) pairs with a linear head over `pair_features` of its encoder
    (the shared embedder itself, frozen, or a fine-tuned copy of it)."""

    def __init__(self, embedder: Embedder, weight: torch.Tensor, bias: torch.Tensor, max_tokens: int = 256,
                 tuned: bool = False):
        if weight.shape != (2 * embedder.dim,) or bias.shape != ():
            raise RerankerError(f"the head has shape {tuple(weight.shape)}; this encoder needs ({2 * embedder.dim},)")
        self.embedder, self.weight, self.bias = embedder, weight, bias
        self.max_tokens, self.tuned = max_tokens, tuned  # tuned: the encoder is the reranker's own copy

    @classmethod
    def load(cls, embedder: Embedder, path: str | Path | None = None, precision: str = "auto") -> Reranker:
        """The head (and fine-tuned encoder) in `path`. A fine-tuned encoder computes in
        `precision`: "fp32", "bf16", or "auto" (bf16 where the CPU has fast bf16; its scores
        agree with fp32 to ~1e-2, tests/test_retrieval_rerank.py)."""
        if precision not in PRECISIONS:
            raise RerankerError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        path = Path(path) if path else default_path()
        try:
            state = load_file(str(path))
        except (OSError, ValueError) as e:
            raise RerankerError(f"cannot load the reranker head from {path}: {e}; train one with "
                                "`parley train reranker`") from None
        encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        max_tokens = int(state["max_tokens"]) if "max_tokens" in state else 256
        if not encoder:
            return cls(embedder, state["weight"], state["bias"], max_tokens)
        own = copy.deepcopy(embedder).float()  # the retrieval's embedder stays as it is
        try:
            own.load_state_dict(encoder)
        except RuntimeError as e:
            raise RerankerError(f"{path} holds an encoder of another shape: {str(e)[:200]}") from None
        # its own copy reads in bf16 where the CPU multiplies bf16 in hardware (several times faster)
        # (oneDNN's bf16 throughout: it scores batches of long pairs, where that beats kernels.c's)
        own = own.in_precision(resolve_precision(precision), path="torch")
        return cls(own.eval(), state["weight"], state["bias"], max_tokens, tuned=True)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {"weight": self.weight.contiguous(), "bias": self.bias.contiguous(),
                 "max_tokens": torch.tensor(self.max_tokens)}
        if self.tuned:
            state |= {f"encoder.{k}": v.detach().float().contiguous() for k, v in self.embedder.state_dict().items()}
        save_file(state, str(tmp))
        tmp.replace(path)  # atomic: a reader never sees half a reranker

    @torch.inference_mode()
    def score(self, query: str, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        return (pair_features(self.embedder, query, texts, max_tokens=self.max_tokens) @ self.weight.float()
                + self.bias.float()).numpy()
