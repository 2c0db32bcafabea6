"""Train the reranker (parley/pipeline/rerank.py) on questions generated for the chunks of an
ingested knowledge base, never on a question a person wrote for measuring.

    parley train reranker --db /tmp/python-docs.db --user bench       # a query map: PARLEY_HOME/query_map.safetensors
    parley train reranker --db ... --kind encoder --lm_questions q.jsonl --exclude benchmarks/data/python_docs_questions.yml
        --negatives 3 --steps 140 --batch 8 --lr 1e-3 --encoder_lr 1e-4   # the cross-encoder: reranker.safetensors

Recipe: sample `questions` chunks; for each, write one question by a template from what the
chunk says about itself: its heading ("how does deque objects work in collections"), a code
name it defines ("what does collections.deque do"), or the content words of one of its
sentences, as a user types a search ("new deque object initialized left right"). Questions a
chat model wrote for other chunks (`lm_questions`, a JSONL written with `lm_questions()` below)
join them: they ask in a user's words rather than the page's. A question too close to one in
an `exclude` file (the measurement sets) is dropped. The chunk is the answer; the hard negatives
are the best hybrid-search chunks of other documents. A fifth of the questions (by `seed`) is
held back to check the result, and written beside the output (`*.heldback.yml`) as a question
set for `benchmarks/retrieval.py --questions`. Kind "encoder" fine-tunes the top `train_layers`
layers of a copy of the encoder with the head (a cross-encoder: the pair read together), `batch`
questions a step, the softmax over each question's group (the answer against its negatives) as
the loss; kind "head" keeps the encoder frozen and trains only a linear head on features
computed once.
"""

from __future__ import annotations

import copy
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from parley.config import parse_cli, setting
from parley.pipeline.embed import Embedder, fast_bf16
from parley.pipeline.grounding import content_words
from parley.pipeline.knowledge import STOPWORDS, KnowledgeConfig, VectorCache, search
from parley.pipeline.query_map import train_query_map
from parley.pipeline.rerank import Reranker, default_path, pair_features
from parley.store import Store

DEFINES = re.compile(r"\b([a-z_]\w*(?:\.[A-Za-z_]\w*)+)\(")


@dataclass
class RerankTrainConfig:
    db: str = setting("", "the store whose documents to write questions for ('' = PARLEY_HOME/parley.db)")
    user: str = setting("local", "whose documents")
    out: str = setting("", "where to write it ('' = PARLEY_HOME/query_map.safetensors, or reranker.safetensors)")
    questions: int = setting(300, "template questions, one per sampled chunk")
    lm_questions: str = setting("", "a JSONL of questions a chat model wrote ({chunk_id, q} per line), used too")
    exclude: list[str] = setting(factory=list, help="question sets (YAML, `questions: [{q: ...}]`) to keep out of training")
    negatives: int = setting(3, "hard negatives per question, from other documents")
    kind: str = setting("map", "map: a query map over the stored vectors (query_map.py); head: a linear head "
                        "over the frozen encoder reading question and passage; encoder: that head and the "
                        "encoder fine-tuned together (a cross-encoder; slow on a CPU)")
    steps: int = setting(200, "fine-tuning steps of the encoder (kind encoder)")
    batch: int = setting(4, "questions per fine-tuning step")
    encoder_lr: float = setting(3e-5, "AdamW learning rate of the encoder when fine-tuned")
    max_tokens: int = setting(256, "longest question + passage pair the reranker reads, in tokens")
    train_layers: int = setting(2, "top layers of the encoder fine-tuned with the head (kind encoder; "
                                "the embeddings and the layers below stay frozen)")
    epochs: int = setting(300, "full-batch passes (kinds map and head)")
    lr: float = setting(1e-2, "learning rate of the map or the head")
    temperature: float = setting(0.05, "softmax temperature of the map's cosines")
    anchor: float = setting(1.0, "weight of the map's pull towards the identity")
    seed: int = setting(0, "sampling, template and held-back split seed")

    def __post_init__(self):
        if self.questions < 10 or self.negatives < 1 or self.epochs < 1 or self.lr <= 0 or self.encoder_lr <= 0:
            raise ValueError(f"need questions >= 10, negatives >= 1, epochs >= 1 and positive rates: {self}")
        if self.steps < 1 or self.batch < 1 or self.max_tokens < 32 or self.temperature <= 0 or self.anchor < 0:
            raise ValueError(f"need steps >= 1, batch >= 1, max_tokens >= 32, temperature > 0, anchor >= 0: {self}")
        if not 1 <= self.train_layers <= 6:
            raise ValueError(f"train_layers must be between 1 and the encoder's 6 layers, not {self.train_layers}")
        if self.kind not in ("map", "head", "encoder"):
            raise ValueError(f"kind must be map, head or encoder, not {self.kind!r}")


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


ASK = ("You write questions. Given a passage from a manual, write one short question that a user could "
       "ask and that the passage answers. Use your own words, not the passage's.")


def lm_questions(engine, tokenizer, texts: list[str], words: int = 160, batch: int = 16) -> list[str | None]:
    """One question per passage written by a chat model (greedy), the way a user would ask it
    rather than in the passage's words; None where the model wrote no usable question (not ending
    in "?", under 4 or over 30 words, or the passage's heading copied back)."""
    from parley.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=40, temperature=0, stop_ids=tokenizer.stop_ids)
    out: list[str | None] = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        prompts = [tokenizer.encode_chat([{"role": "system", "content": ASK}, {"role": "user", "content":
                   "Passage:\n" + " ".join(t.split()[:words]) + "\n\nQuestion:"}]) for t in chunk]
        for text, done in zip(chunk, engine.generate(prompts, params)):
            q = tokenizer.decode(done.tokens).strip().removeprefix("Question:").strip().split("\n")[0].strip()
            usable = q.endswith("?") and 4 <= len(q.split()) <= 30 and q[:40] not in text
            out.append(q if usable else None)
    return out


def too_close(question: str, measured: list[set[str]], limit: float = 0.5) -> bool:
    """The question shares at least `limit` of its content words (Jaccard) with a measured one."""
    words = content_words(question)
    return any(len(words & m) / max(len(words | m), 1) >= limit for m in measured)


def read_lm_questions(path: str | Path) -> dict[int, str]:
    """chunk id -> question, from a JSONL written by `lm_questions` (one {chunk_id, q} a line)."""
    try:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return {int(r["chunk_id"]): str(r["q"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the model's questions from {path}: {e}") from None


def generated_questions(store: Store, user: int, cfg: RerankTrainConfig) -> tuple[list[tuple], dict]:
    """([(chunk id, document id, chunk text, question, source)], counts): a template question for
    each of `cfg.questions` sampled chunks and the model's questions of `cfg.lm_questions` (those
    sharing a content word with their chunk), less any too close to an `exclude` set; source is
    "template" or "lm"."""
    rng = random.Random(cfg.seed)
    rows = store.db.execute("SELECT c.id, c.document_id, c.text FROM chunks c JOIN documents d ON d.id = c.document_id"
                            " WHERE d.user_id = ? ORDER BY c.id", (user,)).fetchall()
    if len(rows) < cfg.questions:
        raise ValueError(f"the store holds {len(rows)} chunks of that user: fewer than the {cfg.questions} questions")
    measured = []
    for path in cfg.exclude:
        try:
            measured += [content_words(q["q"]) for q in yaml.safe_load(Path(path).read_text())["questions"]]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the question set {path} to exclude: {e}") from None
    asked = [(chunk_id, doc, text, question_for(text, _heading(text), rng), "template")
             for chunk_id, doc, text in rng.sample(rows, cfg.questions)]
    if cfg.lm_questions:
        written = read_lm_questions(cfg.lm_questions)
        asked += [(chunk_id, doc, text, written[chunk_id], "lm") for chunk_id, doc, text in rows
                  if chunk_id in written and content_words(written[chunk_id]) & content_words(text)]
    counts = {"excluded": 0, "template": 0, "lm": 0}
    kept = []
    for row in asked:
        if not row[3]:
            continue
        if too_close(row[3], measured):
            counts["excluded"] += 1
            continue
        kept.append(row)
        counts[row[4]] += 1
    return kept, counts


def training_groups(store: Store, embedder: Embedder, user: int, asked: list[tuple], negatives: int) -> list[tuple]:
    """[(question, [answer, negative, ...], source, document id)]: the negatives are the best
    hybrid-search chunks of other documents."""
    cache, plain = VectorCache(), KnowledgeConfig(per_page=0)
    groups = []
    for _, doc, text, question, source in asked:
        found = search(store, embedder, user, question, 20, cache=cache, config=plain)
        others = [c.chunk.text for c in found if c.chunk.document_id != doc][:negatives]
        if len(others) == negatives:
            groups.append((question, [text, *others], source, doc))
    return groups


def map_examples(store: Store, embedder: Embedder, user: int, asked: list[tuple], negatives: int):
    """(question vectors, answer vectors, negative vectors (n, negatives, d), sources) for a query
    map: the negatives are the chunks of other documents nearest the question."""
    ids, matrix = VectorCache().get(store, user)
    row_of = {int(i): r for r, i in enumerate(ids)}
    docs = dict(store.db.execute("SELECT c.id, c.document_id FROM chunks c JOIN documents d ON d.id = c.document_id"
                                 " WHERE d.user_id = ?", (user,)).fetchall())
    asked = [a for a in asked if a[0] in row_of]
    q = embedder([a[3] for a in asked])
    near = np.argsort(-(q @ matrix.T), axis=1)[:, :200]
    others = [[r for r in rows if docs[int(ids[r])] != a[1]][:negatives] for a, rows in zip(asked, near)]
    keep = [i for i, rows in enumerate(others) if len(rows) == negatives]  # a long page may fill the 200 nearest
    neg = np.stack([matrix[others[i]] for i in keep])
    return q[keep], matrix[[row_of[asked[i][0]] for i in keep]], neg, [asked[i][4] for i in keep]


def _heading(text: str) -> str | None:
    head = text.split("\n\n", 1)[0]
    return head if "\n\n" in text and " — " in head else None


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


def fine_tune(embedder: Embedder, groups: list, cfg: RerankTrainConfig, log=print) -> Reranker:
    """A copy of the encoder whose top `cfg.train_layers` layers are trained with the head on the
    groups (answer first). The embeddings and lower layers stay as they are and run without
    gradients, in bf16 where the CPU multiplies it in hardware: the word table's gradient and
    a backward pass through every layer cost most of a step, and the trained layers run under
    bf16 autocast on such a CPU too (benchmarks/RESULTS.md, "The cross-encoder reranker")."""
    torch.manual_seed(cfg.seed)
    encoder = copy.deepcopy(embedder).float().train().requires_grad_(False)
    frozen = len(encoder.layers) - cfg.train_layers
    tuned = encoder.layers[frozen:].requires_grad_(True)
    low = torch.bfloat16 if fast_bf16() else torch.float32
    for part in (encoder.words, encoder.positions, encoder.types, encoder.norm, *encoder.layers[:frozen]):
        part.to(low).eval()
    weight = torch.zeros(2 * embedder.dim, requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    opt = torch.optim.AdamW([{"params": list(tuned.parameters()), "lr": cfg.encoder_lr},
                             {"params": [weight, bias], "lr": cfg.lr}], weight_decay=1e-2)
    order = random.Random(cfg.seed).sample(range(len(groups)), len(groups))
    start, losses = time.perf_counter(), []
    for step in range(cfg.steps):
        picks = [groups[order[(step * cfg.batch + j) % len(order)]] for j in range(cfg.batch)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low == torch.bfloat16):  # halves a step on AMX
            logits = torch.stack([pair_features(encoder, q, texts, max_tokens=cfg.max_tokens, frozen=frozen)
                                  for q, texts, *_ in picks])
        loss = F.cross_entropy(logits.float() @ weight + bias, torch.zeros(len(picks), dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps}: loss {sum(losses[-25:]) / len(losses[-25:]):.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    result = copy.deepcopy(embedder).float()  # the frozen part exact, not the bf16 copy it ran in
    result.layers[frozen:].load_state_dict(tuned.state_dict())
    return Reranker(result.eval(), weight.detach(), bias.detach(), cfg.max_tokens, tuned=True)


def first_rate(reranker: Reranker, groups: list) -> float:
    """Share of groups whose answer (index 0) the reranker scores above every negative."""
    return sum(int(reranker.score(q, texts).argmax() == 0) for q, texts, *_ in groups) / max(len(groups), 1)


def main(cfg: RerankTrainConfig) -> int:
    from parley.registry import parley_home, store_target

    start = time.perf_counter()
    embedder = Embedder.load()
    with Store(store_target(cfg.db or None)) as store:
        found = store.get_user_by_name(cfg.user)
        if found is None:
            raise SystemExit(f"parley: error: no user {cfg.user!r} in that store: ingest documents first")
        asked, counts = generated_questions(store, found.id, cfg)
        held = set(random.Random(cfg.seed + 1).sample(range(len(asked)), len(asked) // 5))
        print(f"{len(asked)} questions ({counts['template']} by template, {counts['lm']} by the model; "
              f"{counts['excluded']} dropped as too close to an excluded set), {len(held)} held back", flush=True)
        if cfg.kind == "map":
            q, pos, neg, sources = map_examples(store, embedder, found.id, asked, cfg.negatives)
        else:
            groups = training_groups(store, embedder, found.id, asked, cfg.negatives)
            held = set(random.Random(cfg.seed + 1).sample(range(len(groups)), len(groups) // 5))
    out = Path(cfg.out) if cfg.out else (parley_home() / "query_map.safetensors" if cfg.kind == "map"
                                         else default_path())
    if cfg.kind == "map":
        train = np.array([i not in held for i in range(len(q))])
        qmap = train_query_map(q[train], pos[train], neg[train], steps=cfg.epochs, lr=cfg.lr,
                               temperature=cfg.temperature, anchor=cfg.anchor, seed=cfg.seed)
        for source in ("template", "lm"):
            back = np.array([not t and s == source for t, s in zip(train, sources)])
            if back.any():
                before, after = (first_of(f(q[back]), pos[back], neg[back]) for f in (lambda v: v, qmap))
                print(f"held-back {source} questions ({back.sum()}): the answer nearer than its {cfg.negatives} "
                      f"nearest negatives in {before:.2f} unmapped, {after:.2f} mapped", flush=True)
        qmap.save(out)
    else:
        train = [g for i, g in enumerate(groups) if i not in held]
        back = [g for i, g in enumerate(groups) if i in held]
        if cfg.kind == "encoder":
            reranker = fine_tune(embedder, train, cfg)
        else:
            with torch.no_grad():  # the encoder is frozen: its features are computed once
                features = torch.stack([pair_features(embedder, q, texts, max_tokens=cfg.max_tokens)
                                        for q, texts, *_ in train])
            reranker = Reranker(embedder, *train_head(features, cfg.epochs, cfg.lr, cfg.seed), cfg.max_tokens)
        reranker.save(out)
        with Store(store_target(cfg.db or None)) as store:
            write_held_back(store, back, out.with_suffix(".heldback.yml"))
        reranker = Reranker.load(embedder, out)  # as search will read it (bf16 where fast)
        for source in ("template", "lm"):
            mine = [g for g in back if g[2] == source]
            if mine:
                began = time.perf_counter()
                rate = first_rate(reranker, mine)
                print(f"held-back {source} questions: the answer first in {rate:.2f} of {len(mine)} groups (chance "
                      f"{1 / (1 + cfg.negatives):.2f}; {(time.perf_counter() - began) / len(mine):.2f} s a group)",
                      flush=True)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    return 0


def write_held_back(store: Store, back: list[tuple], path: Path) -> None:
    """The held-back questions as a question set for benchmarks/retrieval.py (`--questions`): the
    model's questions as "paraphrased", the templates' as "keyword", each answered by its chunk's
    page. Never trained on: they tell how the reranker does on questions it has not seen."""
    names = dict(store.db.execute("SELECT id, name FROM documents").fetchall())
    rows = [{"kind": "paraphrased" if source == "lm" else "keyword", "q": q, "pages": [names[doc]]}
            for q, _, source, doc in back]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"questions": rows}, sort_keys=False))
    tmp.replace(path)


def first_of(q: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """Share of questions whose answer vector is nearer than every negative."""
    return float(((q * pos).sum(-1) > np.einsum("nd,nmd->nm", q, neg).max(-1)).mean())


def train_reranker_main(argv: list[str]) -> int:
    """`parley train reranker [--db PATH] [--user NAME] [--out FILE]`."""
    return main(parse_cli(RerankTrainConfig, argv, prog="parley train reranker"))
