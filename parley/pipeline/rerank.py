"""A cross-encoder reranker: the question and a passage read together by the MiniLM encoder,
scored by a small trained head (issue 17). No cross-encoder weights can be had offline, so the
head is trained here (`parley train reranker`, parley/train/rerank.py) and the encoder is the
sentence encoder of parley/pipeline/embed.py, reused as it is (frozen).

    reranker = Reranker.load(embedder)                     # the head shipped in parley/data/
    scores = reranker.score("how do I sort?", [chunk.text for chunk in hits])   # higher: better

Unlike the embedder, which encodes the question and the passage apart, the encoder here reads
"[CLS] question [SEP] passage [SEP]" in one pass, so attention can match a question's words to
the passage's; the head reads the mean of the last layer's states and the [CLS] state.
`KnowledgeConfig.rerank` (off by default: see benchmarks/RESULTS.md) turns the stage on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from parley.pipeline.embed import Embedder

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "reranker_head.safetensors"


class RerankerError(RuntimeError):
    pass


@torch.inference_mode()
def pair_features(embedder: Embedder, query: str, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """(len(texts), 2 * dim): for each passage, the mean and [CLS] states of the encoder's last
    layer over "[CLS] query [SEP] passage [SEP]" (the passage cut to fit the encoder's window)."""
    tok = embedder.tokenizer
    out = torch.zeros(len(texts), 2 * embedder.dim)
    encodings = [tok.encode(query, text) for text in texts]  # truncation keeps both [SEP]s
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
        x = embedder.norm(embedder.words(ids) + embedder.positions(torch.arange(t)) + embedder.types(types))
        for layer in embedder.layers:
            x = layer(x, keep[:, None, None, :])
        w = keep.unsqueeze(-1).float()
        out[rows] = torch.cat([(x * w).sum(1) / w.sum(1), x[:, 0]], dim=-1)
    return out


class Reranker:
    """Scores (question, passage) pairs with a linear head over `pair_features`."""

    def __init__(self, embedder: Embedder, weight: torch.Tensor, bias: torch.Tensor):
        if weight.shape != (2 * embedder.dim,) or bias.shape != ():
            raise RerankerError(f"the head has shape {tuple(weight.shape)}; this encoder needs ({2 * embedder.dim},)")
        self.embedder, self.weight, self.bias = embedder, weight, bias

    @classmethod
    def load(cls, embedder: Embedder, path: str | Path | None = None) -> Reranker:
        path = Path(path) if path else SHIPPED
        try:
            state = load_file(str(path))
        except (OSError, ValueError) as e:
            raise RerankerError(f"cannot load the reranker head from {path}: {e}; train one with "
                                "`parley train reranker`") from None
        return cls(embedder, state["weight"], state["bias"])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(tmp))
        tmp.replace(path)  # atomic: a reader never sees half a head

    def score(self, query: str, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        return (pair_features(self.embedder, query, texts) @ self.weight + self.bias).numpy()
