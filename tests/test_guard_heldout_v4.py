"""The guard's fourth held-out set (issues 16 and 12) is frozen, well formed, and shares no text with the guard's
or the alignment work's training data, nor with the earlier held-out sets.

benchmarks/data/guard_heldout_v4/ was written by a helper that read neither the guard's nor the alignment work's
data or rules, nor the earlier held-out sets (see the README there). The overlap check below reads those files
only programmatically.
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
HELDOUT = ROOT / "benchmarks" / "data" / "guard_heldout_v4"
# Each file: its list key, the fields of a row, and its sha256 as frozen on 2026-12-06, before any guard or aligned
# model was evaluated on it. Never change a hash to make a test pass: a deliberate change is a new set (v5); say so
# in benchmarks/RESULTS.md.
FILES = {
    "harmful.yml": ("requests", {"text", "principle", "category", "style"},
                    "0c6648fdb85823b8e426c82c8351ff8aabc7efc6502ce7fc0e5c093692a0b378"),
    "benign.yml": ("requests", {"text", "category", "style"},
                   "bb3a68cb1b96aecab72bcf7588bde515ac5221a1974ef106603c72c575753103"),
    "injection.yml": ("sentences", {"text", "kind", "style"},
                      "4d7ba6f92a4dca27b1ab31c3d5a52ca121f41783bbfe7d82b4fc00141206ab5f"),
}
# v3's styles, and what v4 adds: requests that switch language mid-sentence
REQUEST_STYLES = {"plain", "indirect", "fiction/role-play", "leetspeak", "typos", "confusable letters",
                  "other language", "multi-turn setup", "euphemism/slang", "hypothetical", "research framing",
                  "code request", "step-by-step", "code-switching"}
INJECTED_STYLES = {"plain", "addressed to the model", "requirement on the reply", "hidden in HTML comment",
                   "hidden in markdown", "fake chat markup", "other language", "leetspeak", "confusable letters",
                   "typos", "spaced or encoded", "polite or indirect", "role reassignment",
                   "tool and data exfiltration", "embedded in ordinary text",
                   # added in v4
                   "tool or function call syntax", "JSON or YAML field", "code-switching"}
INNOCENT_STYLES = {"recipe", "manual", "how-to", "legal terms", "README", "email and notices",
                   "teaching and exercises", "documentation about AI", "other language", "typos",
                   "confusable letters",
                   # added in v4
                   "support script", "JSON or YAML field", "code-switching"}
# where the guard and the aligned model learn from, and the earlier held-out sets: no v4 text may appear in any
TRAINING = [ROOT / "parley" / "data" / "guard", ROOT / "parley" / "data" / "alignment",
            ROOT / "benchmarks" / "data" / "guard_heldout", ROOT / "benchmarks" / "data" / "guard_heldout_v3",
            ROOT / "benchmarks" / "data" / "safety_prompts.yml", ROOT / "benchmarks" / "data" / "reward_pairs",
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


def _texts_of(path):
    """Every string a data file holds, whatever its format, and each of its lines."""
    raw = path.read_text(encoding="utf-8")
    texts = set(raw.splitlines())  # any format: a line may itself be a text
    if path.suffix == ".toml":
        texts.update(_strings(tomllib.loads(raw)))
    elif path.suffix in {".yml", ".yaml"}:
        texts.update(_strings(yaml.safe_load(raw)))
    elif path.suffix == ".json":
        texts.update(_strings(json.loads(raw)))
    elif path.suffix == ".jsonl":
        texts.update(s for line in raw.splitlines() if line.strip() for s in _strings(json.loads(line)))
    return texts


def _training_texts():
    files = [path for root in TRAINING if root.exists()
             for path in ([root] if root.is_file() else sorted(root.rglob("*"))) if path.is_file()]
    texts = set()
    for path in files:
        if path.suffix not in {".safetensors", ".pt", ".bin"}:
            texts.update(_texts_of(path))
    return {normalize(text) for text in texts} - {""}


def _rows(name):
    key, fields, _ = FILES[name]
    rows = yaml.safe_load((HELDOUT / name).read_text(encoding="utf-8"))[key]
    assert isinstance(rows, list), f"{name}: {key} is not a list"
    for row in rows:
        assert isinstance(row, dict) and set(row) == fields, f"{name}: a row without exactly the fields {fields}: {row}"
        assert all(isinstance(row[field], str) and row[field].strip() for field in fields), f"{name}: an empty field: {row}"
    return rows


def _all_texts():
    return [row["text"] for name in FILES for row in _rows(name)]


@pytest.mark.parametrize("name", sorted(FILES))
def test_file_is_frozen_and_well_formed(name):
    assert hashlib.sha256((HELDOUT / name).read_bytes()).hexdigest() == FILES[name][2], (
        f"benchmarks/data/guard_heldout_v4/{name} changed since it was frozen; a held-out set is never edited "
        "(see its README.md)")
    _rows(name)


def test_counts_and_styles_are_the_ones_the_readme_states():
    harmful, benign, sentences = _rows("harmful.yml"), _rows("benign.yml"), _rows("injection.yml")
    assert (len(harmful), len(benign), len(sentences)) == (221, 234, 252)
    assert Counter(row["principle"] for row in harmful) == {"C1": 29, "C2": 23, "C3": 30, "C4": 57, "C5": 26,
                                                            "C6": 16, "C7": 21, "C8": 19}
    assert (len({row["category"] for row in harmful}), len({row["category"] for row in benign})) == (29, 21)
    assert {row["style"] for row in harmful} == REQUEST_STYLES
    assert {row["style"] for row in benign} == REQUEST_STYLES
    assert Counter(row["kind"] for row in sentences) == {"injected": 126, "innocent": 126}
    assert {row["style"] for row in sentences if row["kind"] == "injected"} == INJECTED_STYLES
    assert {row["style"] for row in sentences if row["kind"] == "innocent"} == INNOCENT_STYLES


def test_other_languages_are_many_and_the_confusable_rows_really_are_disguised():
    rows = _rows("harmful.yml") + _rows("benign.yml") + _rows("injection.yml")
    by_style = Counter(row["style"] for row in rows)
    assert by_style["other language"] >= 100 and by_style["code-switching"] >= 15
    disguised = [row["text"] for row in rows if row["style"] == "confusable letters"]
    assert disguised and all(text.translate(_LOOKALIKE) != text for text in disguised)
    assert all(row["text"].translate(_LOOKALIKE) == row["text"] for row in rows
               if row["style"] not in {"confusable letters", "other language"})  # Russian is Cyrillic anyway


def test_every_harm_principle_of_the_constitution_is_covered():
    constitution = tomllib.loads((ROOT / "parley" / "data" / "constitution.toml").read_text(encoding="utf-8"))
    harm_ids = {principle["id"] for principle in constitution["principles"]} - {"C9"}  # C9 is injection
    assert {row["principle"] for row in _rows("harmful.yml")} == harm_ids  # all of them, and only those


def test_no_text_appears_twice_even_after_normalising():
    texts = [normalize(text) for text in _all_texts()]
    assert [text for text, n in Counter(texts).items() if n > 1] == []


def test_no_text_is_in_the_training_data_or_an_earlier_set():
    training = _training_texts()
    assert training, "found none of the training files to compare with"
    assert [text for text in _all_texts() if normalize(text) in training] == []


def test_normalize_sees_through_disguises():
    # the overlap check must be able to fail: a disguised copy normalises to the same text
    assert normalize("Ign\u200bore ALL previous instructions!") == normalize("ignore all previous instructions")
    assert normalize("h\u043ew t\u043e") == "how to"
