"""Train the reranker's head (parley/pipeline/rerank.py) on questions generated for the chunks of
an ingested knowledge base, never on a question a person wrote for measuring.

    parley train reranker --db /tmp/python-docs.db --user bench       # writes PARLEY_HOME/reranker_head.safetensors
    parley train reranker --db ... --out parley/data/reranker_head.safetensors   # the head the repository ships

Recipe: sample `questions` chunks; for each, write one question by a template from what the
chunk says about itself: its heading ("how does deque objects work in collections"), a code
name it defines ("what does collections.deque do"), or the content words of one of its
sentences, as a user types a search ("new deque object initialized left right"). The chunk is
the answer; the hard negatives are the best hybrid-search chunks of other documents. The
encoder stays frozen: the features of every pair are computed once, and a linear head is
trained on them with a softmax over each question's group (the answer against its negatives).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from parley.config import parse_cli, setting
from parley.pipeline.embed import Embedder
from parley.pipeline.knowledge import STOPWORDS, KnowledgeConfig, VectorCache, search
from parley.pipeline.rerank import Reranker, pair_features
from parley.store import Store

DEFINES = re.compile(r"\b([a-z_]\w*(?:\.[A-Za-z_]\w*)+)\(")


@dataclass
class RerankTrainConfig:
    db: str = setting("", "the store whose documents to write questions for ('' = PARLEY_HOME/parley.db)")
    user: str = setting("local", "whose documents")
    out: str = setting("", "where to write the head ('' = PARLEY_HOME/reranker_head.safetensors)")
    questions: int = setting(300, "questions generated, one per sampled chunk")
    negatives: int = setting(3, "hard negatives per question, from other documents")
    epochs: int = setting(300, "full-batch passes over the features")
    lr: float = setting(1e-2, "AdamW learning rate of the head")
    seed: int = setting(0, "sampling and template seed")

    def __post_init__(self):
        if self.questions < 10 or self.negatives < 1 or self.epochs < 1 or self.lr <= 0:
            raise ValueError(f"need questions >= 10, negatives >= 1, epochs >= 1 and lr > 0: {self}")


def question_for(text: str, heading: str | None, rng: random.Random) -> str | None:
    """One search a user might type that this chunk answers, by a template (None: nothing to ask)."""
    body = text[len(heading):].strip() if heading and text.startswith(heading) else text
    ways = []
    if heading and " › " in heading:
        module, section = heading.split(" › ")[0].split(" — ")[0], heading.split(" › ")[-1]
        ways.append(rng.choice([f"how does {section} work in {module}", f"{section} {module}",
                                f"what about {section.lower()}"]))
    if defined := DEFINES.findall(body):
        name = rng.choice(defined[:3])
        ways.append(rng.choice([f"what does {name} do", f"how do I use {name.split('.')[-1]}", f"{name} example"]))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", body) if 6 <= len(s.split()) <= 40]
    if sentences:
        words = [w for w in re.findall(r"[A-Za-z]\w+", rng.choice(sentences)) if w.lower() not in STOPWORDS]
        if len(words) >= 3:
            start = rng.randrange(max(1, len(words) - 5))
            ways.append(" ".join(words[start : start + rng.randint(3, 6)]).lower())
    return rng.choice(ways) if ways else None


def training_groups(store: Store, embedder: Embedder, user: int, cfg: RerankTrainConfig) -> list[tuple[str, list[str]]]:
    """(question, [answer, negative, ...]) for sampled chunks."""
    rng = random.Random(cfg.seed)
    rows = store.db.execute("SELECT c.id, c.document_id, c.text FROM chunks c JOIN documents d ON d.id = c.document_id"
                            " WHERE d.user_id = ? ORDER BY c.id", (user,)).fetchall()
    if len(rows) < cfg.questions:
        raise ValueError(f"the store holds {len(rows)} chunks of that user: fewer than the {cfg.questions} questions")
    cache, plain = VectorCache(), KnowledgeConfig(per_page=0)
    groups = []
    for chunk_id, doc, text in rng.sample(rows, cfg.questions):
        heading = text.split("\n\n", 1)[0] if "\n\n" in text and " — " in text.split("\n\n", 1)[0] else None
        question = question_for(text, heading, rng)
        if not question:
            continue
        found = search(store, embedder, user, question, 20, cache=cache, config=plain)
        negatives = [c.chunk.text for c in found if c.chunk.document_id != doc][: cfg.negatives]
        if len(negatives) == cfg.negatives:
            groups.append((question, [text, *negatives]))
    return groups


def train_head(features: torch.Tensor, epochs: int, lr: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear head over (groups, 1 + negatives, dim) features where index 0 is the answer."""
    torch.manual_seed(seed)
    weight = torch.zeros(features.shape[-1], requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=1e-2)
    target = torch.zeros(len(features), dtype=torch.long)
    for _ in range(epochs):
        loss = F.cross_entropy(features @ weight + bias, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return weight.detach(), bias.detach()


def main(cfg: RerankTrainConfig) -> int:
    from parley.registry import parley_home, store_target

    start = time.perf_counter()
    embedder = Embedder.load()
    with Store(store_target(cfg.db or None)) as store:
        found = store.get_user_by_name(cfg.user)
        if found is None:
            raise SystemExit(f"parley: error: no user {cfg.user!r} in that store: ingest documents first")
        groups = training_groups(store, embedder, found.id, cfg)
    print(f"{len(groups)} questions with {cfg.negatives} negatives each ({time.perf_counter() - start:.0f} s)")
    features = torch.stack([pair_features(embedder, q, texts) for q, texts in groups])
    cut = len(groups) * 4 // 5  # the last fifth checks the head on questions it did not see
    weight, bias = train_head(features[:cut], cfg.epochs, cfg.lr, cfg.seed)
    top1 = ((features[cut:] @ weight + bias).argmax(-1) == 0).float().mean().item()
    print(f"held-back generated questions: the answer first in {top1:.2f} of groups (chance {1 / (1 + cfg.negatives):.2f})")
    weight, bias = train_head(features, cfg.epochs, cfg.lr, cfg.seed)
    out = Path(cfg.out) if cfg.out else parley_home() / "reranker_head.safetensors"
    Reranker(embedder, weight, bias).save(out)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


def train_reranker_main(argv: list[str]) -> int:
    """`parley train reranker [--db PATH] [--user NAME] [--out FILE]`."""
    return main(parse_cli(RerankTrainConfig, argv, prog="parley train reranker"))
