"""Retrieval that knows a manual's structure (issue 17): heading paths on chunks, identifier-aware
BM25, fusion that keeps an exact identifier match, page-level ranking; and the frozen question
sets of `benchmarks/retrieval.py --manual python`."""

import hashlib
from collections import Counter
from pathlib import Path

import pytest
import yaml

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
