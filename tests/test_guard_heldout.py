"""The guard's held-out evaluation sets (issue 16) are frozen: each file is the one written before
training, and it parses with the fields and counts its README states."""

import hashlib
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "benchmarks" / "data" / "guard_heldout"
# sha256 of each file as frozen on 2026-12-05, before any guard was trained: never change these
# to make a test pass. A deliberate change is a new set: say so in benchmarks/RESULTS.md.
SHA256 = {
    "harmful.yml": "0cc9de521a00243706494d3b7ce6e806e736327246f9c898ea3c7e681e58ee61",
    "benign.yml": "994add03fa2cd65d71c06d70377f0f76247bd50033269c38d7ce7329e98c79d9",
    "injection.yml": "b06505b07b3162571608016dc730a05a2df37737405a6a6a556b0aa8986c4416",
}
REQUEST_STYLES = {"plain", "indirect", "fiction/role-play", "leetspeak", "typos", "confusable letters",
                  "other language", "multi-turn setup"}


def _rows(name, key):
    rows = yaml.safe_load((HELDOUT / name).read_text(encoding="utf-8"))[key]
    assert isinstance(rows, list) and all(isinstance(row, dict) for row in rows), f"{name}: {key} is not a list of maps"
    texts = [row["text"] for row in rows]
    assert all(isinstance(text, str) and text.strip() for text in texts), f"{name}: an empty text"
    assert len(set(texts)) == len(texts), f"{name}: a text appears twice"
    return rows


@pytest.mark.parametrize("name", sorted(SHA256))
def test_file_is_the_frozen_one(name):
    digest = hashlib.sha256((HELDOUT / name).read_bytes()).hexdigest()
    assert digest == SHA256[name], (f"benchmarks/data/guard_heldout/{name} changed since it was frozen; the held-out "
                                    "set must not be edited (see its README.md)")


def test_harmful_requests_name_a_harm_principle():
    constitution = tomllib.loads((ROOT / "parley" / "data" / "constitution.toml").read_text(encoding="utf-8"))
    harm_ids = {principle["id"] for principle in constitution["principles"]} - {"C9"}  # C9 is injection
    rows = _rows("harmful.yml", "requests")
    assert all(set(row) == {"text", "principle", "category", "style"} for row in rows)
    assert all(row["style"] in REQUEST_STYLES for row in rows)
    assert {row["principle"] for row in rows} == harm_ids  # every harm principle, and only those
    assert len(rows) == 146
    assert Counter(row["principle"] for row in rows) == {"C1": 25, "C2": 15, "C3": 23, "C4": 34, "C5": 17,
                                                         "C6": 11, "C7": 13, "C8": 8}
    assert len({row["category"] for row in rows}) == 14


def test_benign_requests():
    rows = _rows("benign.yml", "requests")
    assert all(set(row) == {"text", "category", "style"} for row in rows)
    assert all(row["style"] in REQUEST_STYLES for row in rows)
    assert len(rows) == 140


def test_injection_sentences():
    rows = _rows("injection.yml", "sentences")
    assert all(set(row) == {"text", "label", "style"} for row in rows)
    assert Counter(row["label"] for row in rows) == {"injection": 67, "innocent": 64}


def test_no_line_is_in_two_sets():
    harmful = {row["text"] for row in _rows("harmful.yml", "requests")}
    benign = {row["text"] for row in _rows("benign.yml", "requests")}
    assert not harmful & benign
