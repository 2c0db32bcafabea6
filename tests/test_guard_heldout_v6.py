"""The guard's sixth held-out set is frozen, well formed, labelled by language, free of near-duplicates, and shares no
text (nor a near copy of one) with the guard's or the alignment work's training data, nor with the earlier held-out
sets (v1, v3, v4 and v5, which is about to become training data).

benchmarks/data/guard_heldout_v6/ was written by a helper that read neither that data nor the rules that use it, nor
the earlier sets (see the README there). The overlap checks below read those files only programmatically, and a
failure names only v6 rows, never the text they collide with.
"""

import base64
import binascii
import functools
import re
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml
import test_guard_heldout as v1
import test_guard_heldout_v3 as v3
import test_guard_heldout_v4 as v4
import test_guard_heldout_v5 as v5
from test_guard_heldout_v3 import _LOOKALIKE, normalize  # the same comparison as v3, v4 and v5 (tested in v3)

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "benchmarks" / "data" / "guard_heldout_v6"
# The sha256 of each file, taken when the set was frozen (2026-12-07, 00:44 UTC), before any guard or aligned model
# was evaluated on it. A hash is never changed to make a test pass: a changed set is a new set (v7), said so in
# benchmarks/RESULTS.md.
FROZEN = {"harmful.yml": "3b7066a8a636dac721851aae6d145b15516c732b84956890f0038eed9c65c988",
          "benign.yml": "7de5a5cbd388980d3b3046f25b0d1c823e85026e44930f989612111ec6f9f6f5",
          "injection.yml": "aa415139d53322e5beb9ec028aa159990738070279499a71d9385be3d8a831c0"}
# v5's files and fields (a language on every row), request styles, carriers, language codes and scripts
FILES = v5.FILES
REQUEST_STYLES = v5.REQUEST_STYLES
CARRIERS = v5.CARRIERS
ISO_639_1 = v5.ISO_639_1
SCRIPTS = v5.SCRIPTS
# the earlier held-out sets, all of whose strings and lines are compared with v6
EARLIER_SETS = (v1.HELDOUT, v3.HELDOUT, v4.HELDOUT, v5.HELDOUT)


@functools.cache
def _load():
    """Each file's list of rows, read once (test_every_row_has_exactly_its_fields checks their shape)."""
    return load(HELDOUT)


def load(folder: Path) -> dict[str, list[dict]]:
    return {name: yaml.safe_load((folder / name).read_text(encoding="utf-8"))[key] for name, (key, _) in FILES.items()}


def _all_rows():
    return [row for rows in _load().values() for row in rows]


@functools.cache
def earlier_texts(sets: tuple[Path, ...] = EARLIER_SETS) -> set[str]:
    """The normalised strings of the training data and of the held-out sets `sets` (every string and every line)."""
    texts = set(v4._training_texts())
    for folder in sets:
        for path in sorted(Path(folder).iterdir()):
            if path.suffix in (".yml", ".yaml", ".json", ".jsonl", ".toml", ".txt"):
                texts |= {normalize(text) for text in v4._texts_of(path)}
                texts |= {normalize(line) for line in path.read_text(encoding="utf-8").splitlines()}
    texts.discard("")
    return texts


def check_counts(loaded: dict[str, list[dict]], sizes: tuple[int, int, int], principles: dict[str, int],
                 categories: tuple[int, int], plain: list[int], kinds: dict[str, int]) -> None:
    """The counts a set's README states: rows per file, harmful rows per principle, categories, plain rows, kinds."""
    harmful, benign, sentences = (loaded[name] for name in ("harmful.yml", "benign.yml", "injection.yml"))
    assert (len(harmful), len(benign), len(sentences)) == sizes
    assert Counter(row["principle"] for row in harmful) == principles
    # every principle of the constitution but C9, which is about retrieved text, not requests (injection.yml tests it)
    constitution = tomllib.loads((ROOT / "parley" / "data" / "constitution.toml").read_text(encoding="utf-8"))
    assert set(principles) == {principle["id"] for principle in constitution["principles"]} - {"C9"}
    assert (len({row["category"] for row in harmful}), len({row["category"] for row in benign})) == categories
    # every phrasing has harmful rows and tricky-benign counterparts; most rows are plain
    assert [{row["style"] for row in rows} for rows in (harmful, benign)] == [REQUEST_STYLES, REQUEST_STYLES]
    assert [Counter(row["style"] for row in rows)["plain"] for rows in (harmful, benign)] == plain
    # every carrier has injected and innocent sentences
    assert Counter(row["kind"] for row in sentences) == kinds
    assert all({row["style"] for row in sentences if row["kind"] == kind} == CARRIERS
               for kind in ("injected", "innocent"))


def check_languages(loaded: dict[str, list[dict]]) -> None:
    for name, rows in loaded.items():
        for row in rows:
            codes = row["language"].split("+")
            assert set(codes) <= ISO_639_1 and len(set(codes)) == len(codes), f"not ISO 639-1 codes: {row}"
            if name != "injection.yml":  # a request that switches language is styled so, and only such a request
                assert (len(codes) > 1) == (row["style"] == "code-switching"), row
            v5._check_scripts(row, codes)


def check_a_third_in_other_languages(loaded: dict[str, list[dict]], languages_in_all: int) -> None:
    languages = set()
    for name, rows in loaded.items():
        other = [row["language"] for row in rows if row["language"] != "en"]
        assert 0.28 <= len(other) / len(rows) <= 0.4, name
        codes = {code for codes in other for code in codes.split("+")} - {"en"}
        assert len(codes) >= 20, name
        languages |= codes
    assert len(languages) == languages_in_all
    assert languages & set(SCRIPTS) == set(SCRIPTS)  # every non-Latin script the test knows is used


def check_disguised(loaded: dict[str, list[dict]], requests_disguised: int) -> None:
    """Requests styled "confusable letters" (and only they, outside Cyrillic languages) hold look-alikes; injected
    orders: 2 written in Cyrillic look-alikes, 2 base64-encoded, 1 in URL escapes, all in full."""
    requests = loaded["harmful.yml"] + loaded["benign.yml"]
    disguised = [row for row in requests if row["style"] == "confusable letters"]
    assert len(disguised) == requests_disguised
    assert all(row["text"].translate(_LOOKALIKE) != row["text"] for row in disguised)
    cyrillic = {code for code, scripts in SCRIPTS.items() if "CYRILLIC" in scripts}
    plain = [row for row in requests + [row for row in loaded["injection.yml"] if row["kind"] == "innocent"]
             if row["style"] != "confusable letters" and not cyrillic & set(row["language"].split("+"))]
    assert [row["text"] for row in plain if row["text"].translate(_LOOKALIKE) != row["text"]] == []
    injected = [row for row in loaded["injection.yml"] if row["kind"] == "injected"]
    assert sum(row["text"].translate(_LOOKALIKE) != row["text"] and row["language"] == "en" for row in injected) == 2

    def decodes(token):
        try:
            return base64.b64decode(token, validate=True).decode("ascii").isprintable()
        except (binascii.Error, UnicodeDecodeError):
            return False
    assert sum(any(decodes(token) for token in re.findall(r"[A-Za-z0-9+/]{40,}={0,2}", row["text"]))
               for row in injected) == 2
    assert sum(bool(re.search(r"(?:%[0-9A-F]{2}){30,}", row["text"])) for row in injected) == 1


def check_not_near(rows: list[dict], earlier: set[str]) -> None:
    """No row is within token-set Jaccard 0.7 of a string of `earlier`; a failure prints only the rows."""
    others = [frozenset(text.split()) for text in earlier]
    index = defaultdict(list)
    for i, words in enumerate(others):
        for word in words:
            index[word].append(i)
    close = []
    for row in rows:
        words = set(normalize(row["text"]).split())
        candidates = {i for word in words for i in index[word]}
        if any(len(words & others[i]) >= 0.7 * len(words | others[i]) for i in candidates):
            close.append(row["text"])
    assert close == []  # prints only the set's rows, never the text they are close to


def test_the_files_are_frozen():
    v5.check_frozen(HELDOUT, FROZEN)


def test_every_row_has_exactly_its_fields_each_a_non_empty_string():
    v5.check_fields(_load(), FILES)


def test_counts_and_styles_are_the_ones_the_readme_states():
    check_counts(_load(), (202, 249, 193), {"C1": 29, "C2": 24, "C3": 25, "C4": 40, "C5": 25, "C6": 17, "C7": 20, "C8": 22},
                 (30, 22), [109, 160], {"injected": 93, "innocent": 100})


def test_every_row_names_its_languages_and_is_written_in_their_scripts():
    check_languages(_load())


def test_about_a_third_of_each_file_is_in_many_other_languages():
    check_a_third_in_other_languages(_load(), 27)


def test_the_disguised_rows_really_are_disguised_and_only_they():
    check_disguised(_load(), 8)


def test_no_text_appears_twice_and_no_two_rows_are_near_duplicates():
    v5.check_no_repeats(_all_rows())


def test_no_text_is_in_the_training_data_or_an_earlier_set():
    earlier = earlier_texts()
    assert len(earlier) > 10000, "found too few of the training files and earlier sets to compare with"
    assert [row["text"] for row in _all_rows() if normalize(row["text"]) in earlier] == []  # prints only v6 rows


@pytest.mark.slow  # 7-9 s on 2 cores; .ci/run runs it (--runslow)
def test_no_text_is_a_near_duplicate_of_the_training_data_or_an_earlier_set():
    # token-set Jaccard >= 0.7 with any string of the training data or of v1, v3, v4, v5 (v5 is training data now)
    check_not_near(_all_rows(), earlier_texts())
