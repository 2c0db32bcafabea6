"""Retrieval that knows a manual's structure (issue 17): heading paths on chunks, identifier-aware
BM25, fusion that keeps an exact identifier match, page-level ranking; and the frozen question
sets of `benchmarks/retrieval.py --manual python`."""

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pg import store_target  # noqa: F401 (a fixture)
from test_knowledge import store  # noqa: F401 (a fixture; `embedder` is conftest's)

from parley.pipeline.knowledge import KnowledgeConfig, identifiers, ingest, keywords, search
from parley.pipeline.readers import Section, chunk_sections, read_bytes
from parley.pipeline.rerank import Reranker, RerankerError, pair_features

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data"
# sha256 of each set as frozen on 2026-12-05, before any ranking over the manual was run: never
# change these to make a test pass. A deliberate change is a new set: say so in benchmarks/RESULTS.md.
SHA256 = {
    "python_docs_questions.yml": "194b379481bc00de9a4c4d2faf1abbd422c227d835044adbd50b5d895e10ae0f",
    "python_docs_tuning.yml": "7ac16f9f11e4b7baa646e567ea76bba3db213396a466ea44408b05d0673a7262",
}


@pytest.mark.parametrize("name", sorted(SHA256))
def test_question_set_is_the_frozen_one(name):
    digest = hashlib.sha256((DATA / name).read_bytes()).hexdigest()
    assert digest == SHA256[name], f"benchmarks/data/{name} changed since it was frozen (see python_docs_questions.md)"


def test_question_sets_are_well_formed_and_apart():
    sets = {name: yaml.safe_load((DATA / name).read_text())["questions"] for name in SHA256}
    for name, questions in sets.items():
        assert all(set(q) == {"q", "kind", "pages"} and q["pages"] for q in questions), name
        assert all(p.endswith(".html") and not p.startswith("/") for q in questions for p in q["pages"]), name
        texts = [q["q"] for q in questions]
        assert len(set(texts)) == len(texts), f"{name}: a question appears twice"
    heldout = Counter(q["kind"] for q in sets["python_docs_questions.yml"])
    assert heldout["paraphrased"] >= 100 and heldout["keyword"] >= 60 and set(heldout) == {"paraphrased", "keyword"}
    assert len(sets["python_docs_tuning.yml"]) >= 40
    wordings = [{q["q"].lower() for q in questions} for questions in sets.values()]
    assert not wordings[0] & wordings[1], "a tuning question is also a held-out one"


# --- structure: heading paths on chunks -------------------------------------------------------

PAGE = (b"<html><body><article><h1>kettles \xe2\x80\x94 Boiling water</h1><p>This module boils water.</p>"
        b"<h2>Descaling</h2>" + b"".join(b"<p>Step %d: pour white vinegar into the kettle and let it stand.</p>" % i
                                           for i in range(12))
        + b"<h3>Vinegar strength</h3><p>Use vinegar of five percent acidity, diluted one to one.</p>"
        b"<h2>Safety</h2><p>Never open the lid while the water boils.</p></article></body></html>")


def test_html_sections_and_chunks_carry_their_heading_path():
    _, sections = read_bytes("kettles.html", PAGE)
    assert [s.heading for s in sections] == [
        "kettles — Boiling water", "kettles — Boiling water › Descaling",
        "kettles — Boiling water › Descaling › Vinegar strength", "kettles — Boiling water › Safety"]
    chunks = chunk_sections(sections, words=40, overlap=10)
    for chunk in chunks:  # the path heads the text that is embedded and indexed (the page's first: its title)
        assert chunk.heading and chunk.text.startswith(chunk.heading)
    safety = next(c for c in chunks if "lid" in c.text)
    assert safety.heading == "kettles — Boiling water › Safety" and "vinegar" not in safety.text  # no overlap across a heading
    assert safety.text.startswith("kettles — Boiling water › Safety\n\nSafety\n\nNever open the lid")
    strength = next(c for c in chunks if "acidity" in c.text)
    assert strength.text.startswith("kettles — Boiling water › Descaling › Vinegar strength")
    # plain text has no headings: its chunks are as before
    [plain] = chunk_sections([Section("Just one sentence of notes.")])
    assert plain.heading is None and plain.text == "Just one sentence of notes."


# --- identifier-aware BM25 and fusion ---------------------------------------------------------


def test_code_names_are_found_and_kept_whole():
    assert identifiers("What does asyncio.gather do with os.path.join and __slots__?") == [
        "asyncio.gather", "os.path.join", "__slots__"]
    assert identifiers("ThreadPoolExecutor max_workers and maxBytes") == ["ThreadPoolExecutor", "max_workers", "maxBytes"]
    assert identifiers("how do I copy a list, e.g. this one? Deque objects") == []
    assert keywords("What does asyncio.gather do?") == "asyncio.gather asyncio gather"
    assert keywords("the of") == "the of"




def _ingest(store, embedder, tmp_path, docs: dict[str, str]) -> int:
    user = store.add_user("ann").id
    for name, text in docs.items():
        (tmp_path / name).write_text(text)
    ingest(store, embedder, user, [tmp_path / name for name in docs])
    return user


def test_bm25_finds_a_dotted_name_as_one_phrase(store, embedder, tmp_path):
    user = _ingest(store, embedder, tmp_path, {
        "ospath.txt": "os.path.join(path, *paths) joins one or more path segments intelligently.",
        "essay.txt": "The os of a city is its path; join the path, walk the path, the os path and the join. " * 3,
    })
    found = search(store, embedder, user, "os.path.join", 2, mode="bm25")
    assert [c.chunk.document_name for c in found] == ["ospath.txt", "essay.txt"]


DEQUE = {  # in this order: on a tie of fused scores the older chunk comes first
    "collection.txt": "What happens when the collection is full? When a full collection gets a new item, the oldest "
                      "item is dropped.",
    "deque.txt": "class collections.deque([iterable[, maxlen]]) returns a new deque object initialized left-to-right "
                 "with data from iterable. If maxlen is given, the deque is bounded to that length.",
    "container.txt": "A container at capacity refuses new items.",
}


def test_fusion_keeps_the_page_that_defines_a_named_api_first(store, embedder, tmp_path):
    user = _ingest(store, embedder, tmp_path, DEQUE)
    question = "What happens when a collections.deque is full?"
    # fused with equal weights, as before issue 17: the page that only shares the question's
    # meaning ("what happens when ... full") ties with the one that defines collections.deque and
    # comes first
    plain = KnowledgeConfig(identifier_weight=1.0, exact_bonus=0.0, per_page=0)
    before = search(store, embedder, user, question, 3, config=plain)
    assert before[0].chunk.document_name == "collection.txt" and before[1].chunk.document_name == "deque.txt"
    found = search(store, embedder, user, question, 3)
    assert found[0].chunk.document_name == "deque.txt" and found[0].bm25_rank is not None


def test_pages_are_ranked_and_give_at_most_per_page_chunks(store, embedder, tmp_path):
    long = " ".join(f"Fact {i}: the boiler in the cellar is serviced in October by the gas engineer." for i in range(60))
    user = _ingest(store, embedder, tmp_path, {
        "boiler.txt": long,
        "garden.txt": "The garden shed is painted in October, after the boiler service.",
        "car.txt": "The car is serviced every spring at the garage.",
    })
    question = "when is the boiler serviced?"
    chunks = search(store, embedder, user, question, 4, config=KnowledgeConfig(per_page=0))
    assert {c.chunk.document_name for c in chunks} == {"boiler.txt"} and chunks[0].page_score is None
    pages = search(store, embedder, user, question, 4, config=KnowledgeConfig(per_page=1))
    names = [c.chunk.document_name for c in pages]
    assert names[0] == "boiler.txt" and len(set(names)) == len(names) == 3  # one chunk per page, every page
    assert [c.page_score for c in pages] == sorted((c.page_score for c in pages), reverse=True)
    two = search(store, embedder, user, question, 4, config=KnowledgeConfig(per_page=2))
    assert [c.chunk.document_name for c in two][:2] == ["boiler.txt", "boiler.txt"] and len(two) == 4
    assert two[0].fused >= two[1].fused  # a page's best chunk first


# --- the reranker stage -----------------------------------------------------------------------


def test_reranker_reads_pairs_and_reorders_the_best_chunks(store, embedder, tmp_path):
    user = _ingest(store, embedder, tmp_path, DEQUE)
    question = "What happens when a collections.deque is full?"
    texts = list(DEQUE.values())
    features = pair_features(embedder, question, texts)
    assert features.shape == (3, 2 * embedder.dim)  # batched and single agree (the same pairs, padded apart)
    assert torch.allclose(features[1], pair_features(embedder, question, [texts[1]])[0], atol=1e-5)
    # a head that scores a pair by one feature, saved and loaded again; the order follows its scores
    weight = torch.zeros(2 * embedder.dim)
    weight[int((features[2] - features[:2].max(0).values).argmax())] = 1.0  # container.txt scores highest
    reranker = Reranker(embedder, weight, torch.tensor(0.0))
    reranker.save(tmp_path / "head.safetensors")
    loaded = Reranker.load(embedder, tmp_path / "head.safetensors")
    scores = loaded.score(question, texts)
    assert np.allclose(scores, reranker.score(question, texts))
    found = search(store, embedder, user, question, 3, config=KnowledgeConfig(per_page=0), reranker=loaded)
    by_score = [name for _, name in sorted(zip(-scores, DEQUE))]
    assert [c.chunk.document_name for c in found] == by_score
    with pytest.raises(RerankerError, match="train one"):
        Reranker.load(embedder, tmp_path / "missing.safetensors")
