"""The guard's fourth held-out set (issues 16 and 12) is frozen, well formed, and shares no text with the guard's
or the alignment work's training data, nor with the earlier held-out sets.

benchmarks/data/guard_heldout_v4/ was written by a helper that read neither the guard's nor the alignment work's
data or rules, nor the earlier held-out sets (see the README there). The overlap check below reads those files
only programmatically.
"""

import functools
import hashlib
import json
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml
import test_guard_heldout_v3 as v3
from test_guard_heldout_v3 import _LOOKALIKE, _strings, normalize  # the same comparison as v3's (tested there)

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "benchmarks" / "data" / "guard_heldout_v4"
# The sha256 of each file, taken when the set was frozen (2026-12-06, 07:03 UTC), before any guard or aligned model
# was evaluated on it. A hash is never changed to make a test pass: a changed set is a new set (v5), said so in
# benchmarks/RESULTS.md.
FROZEN = {"harmful.yml": "0c6648fdb85823b8e426c82c8351ff8aabc7efc6502ce7fc0e5c093692a0b378",
          "benign.yml": "bb3a68cb1b96aecab72bcf7588bde515ac5221a1974ef106603c72c575753103",
          "injection.yml": "4d7ba6f92a4dca27b1ab31c3d5a52ca121f41783bbfe7d82b4fc00141206ab5f"}
FILES = {name: v3.FILES[name][:2] for name in FROZEN}  # each file's list key and row fields, as in v3
# v3's styles, and what v4 adds: rows that switch language midway, orders written as tool calls or data fields,
# and scripts for support staff among the innocent sentences
REQUEST_STYLES = v3.REQUEST_STYLES | {"code-switching"}
INJECTED_STYLES = v3.INJECTED_STYLES | {"tool or function call syntax", "JSON or YAML field", "code-switching"}
INNOCENT_STYLES = v3.INNOCENT_STYLES | {"support script", "JSON or YAML field", "code-switching"}
# where the guard and the aligned model learn from, and the earlier held-out sets: no v4 text may appear in any
TRAINING = [ROOT / "parley" / "data" / "guard", ROOT / "parley" / "data" / "alignment",
            ROOT / "benchmarks" / "data" / "guard_heldout", ROOT / "benchmarks" / "data" / "guard_heldout_v3",
            ROOT / "benchmarks" / "data" / "safety_prompts.yml", ROOT / "benchmarks" / "data" / "reward_pairs",
            ROOT / "parley" / "data" / "constitution.toml"]


_PARSE = {".toml": tomllib.loads, ".yml": yaml.safe_load, ".yaml": yaml.safe_load, ".json": json.loads,
          ".jsonl": lambda raw: [json.loads(line) for line in raw.splitlines() if line.strip()]}


def _texts_of(path):
    """Every string a data file holds, whatever its format, and each of its lines (a line may itself be a text)."""
    raw = path.read_text(encoding="utf-8")
    parse = _PARSE.get(path.suffix)
    return set(raw.splitlines()) | (set(_strings(parse(raw))) if parse else set())


def _training_texts():
    files = [path for root in TRAINING if root.exists()
             for path in ([root] if root.is_file() else sorted(root.rglob("*"))) if path.is_file()]
    texts = set()
    for path in files:
        if path.suffix not in {".safetensors", ".pt", ".bin"}:
            texts.update(_texts_of(path))
    return {normalize(text) for text in texts} - {""}


@functools.cache
def _load():
    """Each file's rows, read once; every row has exactly its file's fields, each a non-empty string."""
    loaded = {}
    for name, (key, fields) in FILES.items():
        rows = yaml.safe_load((HELDOUT / name).read_text(encoding="utf-8"))[key]
        assert isinstance(rows, list), f"{name}: {key} is not a list"
        bad = [row for row in rows if not isinstance(row, dict) or set(row) != fields
               or not all(isinstance(row[field], str) and row[field].strip() for field in fields)]
        assert bad == [], f"{name}: rows without exactly the non-empty fields {sorted(fields)}"
        loaded[name] = rows
    return loaded


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_file_is_frozen(name):
    assert hashlib.sha256((HELDOUT / name).read_bytes()).hexdigest() == FROZEN[name], (
        f"benchmarks/data/guard_heldout_v4/{name} changed since it was frozen; a held-out set is never edited "
        "(see its README.md)")


def test_counts_and_styles_are_the_ones_the_readme_states():
    harmful, benign, sentences = (_load()[name] for name in ("harmful.yml", "benign.yml", "injection.yml"))
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
    rows = [row for rows in _load().values() for row in rows]
    by_style = Counter(row["style"] for row in rows)
    assert by_style["other language"] >= 100 and by_style["code-switching"] >= 15
    disguised = [row["text"] for row in rows if row["style"] == "confusable letters"]
    assert disguised and all(text.translate(_LOOKALIKE) != text for text in disguised)
    assert all(row["text"].translate(_LOOKALIKE) == row["text"] for row in rows
               if row["style"] not in {"confusable letters", "other language"})  # Russian is Cyrillic anyway


def test_every_harm_principle_of_the_constitution_is_covered():
    constitution = tomllib.loads((ROOT / "parley" / "data" / "constitution.toml").read_text(encoding="utf-8"))
    harm_ids = {principle["id"] for principle in constitution["principles"]} - {"C9"}  # C9 is injection
    assert {row["principle"] for row in _load()["harmful.yml"]} == harm_ids  # all of them, and only those


def test_no_text_appears_twice_even_after_normalising():
    texts = Counter(normalize(row["text"]) for rows in _load().values() for row in rows)
    assert [text for text, n in texts.items() if n > 1] == []


def test_no_text_is_in_the_training_data_or_an_earlier_set():
    training = _training_texts()
    assert training, "found none of the training files to compare with"
    assert [row["text"] for rows in _load().values() for row in rows if normalize(row["text"]) in training] == []
