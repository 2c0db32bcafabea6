"""A trained map of question vectors into the manual's own vector space (issue 17): the dense
ranking compares the mapped question with the stored chunk vectors, which stay as ingested.

    qmap = QueryMap.load("query_map.safetensors")    # written by `parley train reranker --kind map`
    search(store, embedder, user, "how do I sort?", config=cfg, query_map=qmap)

A user's question and the passage that answers it are worded differently ("how do I stop a
thread" / "Event objects ... set() ... wait()"); the sentence encoder was not trained on this
manual's pairs. A linear map W, started at the identity and trained on questions generated for
the manual's chunks (parley/train/rerank.py), moves a question's vector towards the chunks that
answer such questions; the chunk vectors are not touched, so nothing is re-ingested and a query
costs one 384x384 product more. This is a bi-encoder fine-tune of the query side only: the same
idea as LlamaIndex's linear embedding adapter. The relevance threshold of the knowledge stage
still reads the unmapped cosine, so what counts as relevant does not move with training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class QueryMapError(RuntimeError):
    pass


class QueryMap:
    """q -> W q / |W q| for unit question vectors of the encoder's width."""

    def __init__(self, weight: torch.Tensor):
        if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
            raise QueryMapError(f"a query map is a square matrix, not {tuple(weight.shape)}")
        self.weight = weight.float()
        self.matrix = self.weight.numpy().T.copy()  # rows act on row vectors: q @ W.T

    @property
    def dim(self) -> int:
        return self.weight.shape[0]

    def __call__(self, q: np.ndarray) -> np.ndarray:
        if q.shape[-1] != self.dim:
            raise QueryMapError(f"the query map is for {self.dim}-dimensional vectors, not {q.shape[-1]}")
        mapped = q @ self.matrix
        return (mapped / np.linalg.norm(mapped, axis=-1, keepdims=True).clip(1e-12)).astype(np.float32)

    @classmethod
    def load(cls, path: str | Path) -> QueryMap:
        try:
            return cls(load_file(str(path))["weight"])
        except (OSError, ValueError, KeyError) as e:
            raise QueryMapError(f"cannot load a query map from {path}: {e}; train one with "
                                "`parley train reranker --kind map`") from None

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"weight": self.weight.contiguous()}, str(tmp))
        tmp.replace(path)  # atomic


def train_query_map(questions: np.ndarray, positives: np.ndarray, negatives: np.ndarray, *, steps: int = 300,
                    lr: float = 1e-3, temperature: float = 0.05, anchor: float = 1.0, seed: int = 0) -> QueryMap:
    """W trained so that each question's mapped vector is nearer its answer than its negatives:
    softmax cross-entropy over [answer, negatives] of cosine / temperature, full batch, plus
    `anchor` * |W - I|^2 (mean over entries) to stay near the encoder's own space.
    questions (n, d), positives (n, d), negatives (n, m, d): unit vectors."""
    torch.manual_seed(seed)
    q, pos, neg = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (questions, positives, negatives))
    candidates = torch.cat([pos[:, None], neg], dim=1)  # (n, 1 + m, d), answer first
    eye = torch.eye(q.shape[1])
    weight = eye.clone().requires_grad_(True)
    opt = torch.optim.Adam([weight], lr=lr)
    target = torch.zeros(len(q), dtype=torch.long)
    for _ in range(steps):
        mapped = torch.nn.functional.normalize(q @ weight.T, dim=-1)
        logits = torch.einsum("nd,nmd->nm", mapped, candidates) / temperature
        loss = torch.nn.functional.cross_entropy(logits, target) + anchor * ((weight - eye) ** 2).mean() * q.shape[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return QueryMap(weight.detach())
