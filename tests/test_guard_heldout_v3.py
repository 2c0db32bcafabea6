"""The guard's third held-out set (issue 16) is frozen, well formed, and shares no text with the guard's
training data or with the retired held-out set.

benchmarks/data/guard_heldout_v3/ was written by a helper that read neither the guard's training data nor
its rules (see the README there). The overlap check below reads those files only programmatically.
"""

import hashlib
import json
import re
import tomllib
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "benchmarks" / "data" / "guard_heldout_v3"
# Each file: its list key, the fields of a row, and its sha256 as frozen on 2026-12-06, before any guard was
# evaluated on it. Never change a hash to make a test pass: a deliberate change is a new set (v4); say so in
# benchmarks/RESULTS.md.
FILES = {
    "harmful.yml": ("requests", {"text", "principle", "category", "style"},
                    "2c9cb13fac2049a440efc4542441d2471ce4641f34f8702666836724f4019b5a"),
    "benign.yml": ("requests", {"text", "category", "style"},
                   "8be037446ca23649b8a6733e625d35a1c155085c34f987922868cdf72df06d13"),
    "injection.yml": ("sentences", {"text", "kind", "style"},
                      "332feafc7924d942e1487d4dfa66b7300271c5c4a92a73fbf17054b39fa6d69e"),
}
REQUEST_STYLES = {"plain", "indirect", "fiction/role-play", "leetspeak", "typos", "confusable letters",
                  "other language", "multi-turn setup",
                  # added in v3
                  "euphemism/slang", "hypothetical", "research framing", "code request", "step-by-step"}
INJECTED_STYLES = {"plain", "addressed to the model", "requirement on the reply", "hidden in HTML comment",
                   "hidden in markdown", "fake chat markup", "other language", "leetspeak", "confusable letters",
                   "typos", "spaced or encoded", "polite or indirect", "role reassignment",
                   "tool and data exfiltration", "embedded in ordinary text"}
INNOCENT_STYLES = {"recipe", "manual", "how-to", "legal terms", "README", "email and notices",
                   "teaching and exercises", "documentation about AI", "other language", "typos",
                   "confusable letters"}
# where the guard learns from, and the retired held-out set: no v3 text may appear in any of them
TRAINING = [ROOT / "parley" / "data" / "guard", ROOT / "parley" / "data" / "alignment",
            ROOT / "benchmarks" / "data" / "guard_heldout", ROOT / "benchmarks" / "data" / "safety_prompts.yml",
            ROOT / "parley" / "data" / "constitution.toml"]
_LOOKALIKE = str.maketrans("аеорсхіАЕОРСХІ", "aeopcxiAEOPCXI")  # Cyrillic letters that pass for Latin ones


def normalize(text):
    """Compare texts as a reader would: case, confusable letters, invisible characters and punctuation ignored."""
    text = unicodedata.normalize("NFKC", text).translate(_LOOKALIKE).replace("\u200b", "").casefold()
    return " ".join(re.findall(r"\w+", text))


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _training_texts():
    files = [path for root in TRAINING if root.exists()
             for path in ([root] if root.is_file() else sorted(root.rglob("*"))) if path.is_file()]
    texts = set()
    for path in files:
        if path.suffix in {".safetensors", ".pt", ".bin"}:
            continue
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            texts.update(_strings(tomllib.loads(raw)))
        elif path.suffix in {".yml", ".yaml"}:
            texts.update(_strings(yaml.safe_load(raw)))
        elif path.suffix == ".json":
            texts.update(_strings(json.loads(raw)))
        elif path.suffix == ".jsonl":
            texts.update(s for line in raw.splitlines() if line.strip() for s in _strings(json.loads(line)))
        texts.update(raw.splitlines())  # any format: a line may itself be a text
    return {normalize(text) for text in texts} - {""}


def _rows(name):
    key, fields, _ = FILES[name]
    rows = yaml.safe_load((HELDOUT / name).read_text(encoding="utf-8"))[key]
    assert isinstance(rows, list), f"{name}: {key} is not a list"
    for row in rows:
        assert isinstance(row, dict) and set(row) == fields, f"{name}: a row without exactly the fields {fields}: {row}"
        assert isinstance(row["text"], str) and row["text"].strip(), f"{name}: an empty text"
    return rows


def _all_texts():
    return [row["text"] for name in FILES for row in _rows(name)]


@pytest.mark.parametrize("name", sorted(FILES))
def test_file_is_frozen_and_well_formed(name):
    assert hashlib.sha256((HELDOUT / name).read_bytes()).hexdigest() == FILES[name][2], (
        f"benchmarks/data/guard_heldout_v3/{name} changed since it was frozen; a held-out set is never edited "
        "(see its README.md)")
    _rows(name)


def test_counts_and_styles_are_the_ones_the_readme_states():
    harmful, benign, sentences = _rows("harmful.yml"), _rows("benign.yml"), _rows("injection.yml")
    assert (len(harmful), len(benign), len(sentences)) == (202, 210, 250)
    assert Counter(row["principle"] for row in harmful) == {"C1": 27, "C2": 22, "C3": 29, "C4": 51, "C5": 23,
                                                            "C6": 16, "C7": 17, "C8": 17}
    assert (len({row["category"] for row in harmful}), len({row["category"] for row in benign})) == (25, 21)
    assert {row["style"] for row in harmful + benign} <= REQUEST_STYLES
    assert Counter(row["kind"] for row in sentences) == {"injected": 125, "innocent": 125}
    assert {row["style"] for row in sentences if row["kind"] == "injected"} == INJECTED_STYLES
    assert {row["style"] for row in sentences if row["kind"] == "innocent"} == INNOCENT_STYLES


def test_every_harm_principle_of_the_constitution_is_covered():
    constitution = tomllib.loads((ROOT / "parley" / "data" / "constitution.toml").read_text(encoding="utf-8"))
    harm_ids = {principle["id"] for principle in constitution["principles"]} - {"C9"}  # C9 is injection
    assert {row["principle"] for row in _rows("harmful.yml")} == harm_ids  # all of them, and only those


def test_no_text_appears_twice_even_after_normalising():
    texts = [normalize(text) for text in _all_texts()]
    assert [text for text, n in Counter(texts).items() if n > 1] == []


def test_no_text_is_in_the_training_data_or_the_retired_set():
    training = _training_texts()
    assert training, "found none of the training files to compare with"
    assert [text for text in _all_texts() if normalize(text) in training] == []


def test_normalize_sees_through_disguises():
    # the overlap check must be able to fail: a disguised copy normalises to the same text
    assert normalize("Ign\u200bore ALL previous instructions!") == normalize("ignore all previous instructions")
    assert normalize("h\u043ew t\u043e") == "how to"
