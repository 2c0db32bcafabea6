"""The guard's fifth held-out set (issues 16 and 12) is frozen, well formed, labelled by language, free of
near-duplicates, and shares no text with the guard's or the alignment work's training data, nor with the earlier
held-out sets (v1, v3, v4).

benchmarks/data/guard_heldout_v5/ was written by a helper that read neither that data nor the rules that use it, nor
the earlier sets (see the README there). The overlap check below reads those files only programmatically.
"""

import functools
import hashlib
import itertools
import tomllib
import unicodedata
from collections import Counter
from pathlib import Path

import yaml
import test_guard_heldout_v4 as v4
from test_guard_heldout_v3 import _LOOKALIKE, normalize  # the same comparison as v3's and v4's (tested in v3)

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "benchmarks" / "data" / "guard_heldout_v5"
# The sha256 of each file, taken when the set was frozen (2026-12-06, 13:12 UTC), before any guard or
# aligned model was evaluated on it. A hash is never changed to make a test pass: a changed set is a new set (v6),
# said so in benchmarks/RESULTS.md.
FROZEN = {"harmful.yml": "f327d7b043fdca26b266204425f6d40c27c7296cb668fff7b46bf65658d47c96",
          "benign.yml": "9095d5b0a4a5b60bdd6d3ee70df0e9f887014f3c869f6471f6972a46aec10f52",
          "injection.yml": "21697227766c824f72b9eaa9bc44735df10326a586d808969f721163ce5cc314"}
# v4's files and fields, and a language on every row
FILES = {name: (key, fields | {"language"}) for name, (key, fields) in v4.FILES.items()}
# v4's request styles, less "other language" (the language is its own field now), and two phrasings v5 adds: a request
# moved into the past ("how did people ...") and one wrapped in another task (translate, proofread, summarise this)
REQUEST_STYLES = (v4.REQUEST_STYLES - {"other language"}) | {"past tense", "task wrapper"}
# In injection.yml the style is the carrier a sentence sits in; injected and innocent sentences share every carrier.
CARRIERS = {"web page", "email", "PDF text", "code comment", "tool result", "JSON or YAML field", "chat or forum post",
            "review or comment", "calendar or form", "README", "recipe", "manual", "support script", "legal terms",
            "teaching and exercises", "documentation about AI"}
ISO_639_1 = set("""aa ab ae af ak am an ar as av ay az ba be bg bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv
dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii ik io is it iu
ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne
ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq sr ss st su sv
sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh yi yo za zh zu""".split())
# the script a language is written in, where it is not Latin (a romanised row, e.g. Hindi in Latin letters, is
# written as code-switching, where the script is not required)
SCRIPTS = {"ru": {"CYRILLIC"}, "uk": {"CYRILLIC"}, "el": {"GREEK"}, "zh": {"CJK"}, "ko": {"HANGUL"},
           "ja": {"CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA"}, "ar": {"ARABIC"}, "he": {"HEBREW"},
           "hi": {"DEVANAGARI"}}


@functools.cache
def _load():
    """Each file's list of rows, read once (test_every_row_has_exactly_its_fields checks their shape)."""
    return {name: yaml.safe_load((HELDOUT / name).read_text(encoding="utf-8"))[key] for name, (key, _) in FILES.items()}


def _all_rows():
    return [row for rows in _load().values() for row in rows]


def _scripts(text):
    """The scripts of a text's letters, by the first word of their Unicode names (LATIN, CYRILLIC, CJK ...)."""
    return {unicodedata.name(char, "?").split()[0] for char in text if char.isalpha()}


def _check_scripts(row, codes):
    """A row's letters (look-alikes read as Latin) are Latin or of its languages' scripts, and a row in one language
    with a script of its own uses it."""
    allowed = {"LATIN"}.union(*(SCRIPTS.get(code, set()) for code in codes))
    scripts = _scripts(row["text"].translate(_LOOKALIKE))
    assert scripts <= allowed, f"letters from {scripts - allowed} in a row marked {row['language']}: {row}"
    if len(codes) == 1 and codes[0] in SCRIPTS:
        assert scripts & SCRIPTS[codes[0]], f"no letter of its own script in a row marked {codes[0]}: {row}"


def check_frozen(folder: Path, frozen: dict[str, str]) -> None:
    """Each file of a held-out folder still has the sha256 it was frozen with (v6's test uses it too)."""
    changed = [name for name, digest in frozen.items()
               if hashlib.sha256((folder / name).read_bytes()).hexdigest() != digest]
    assert changed == [], (f"{changed} in {folder.relative_to(ROOT)}/ changed since the set was frozen; "
                           "a held-out set is never edited (see its README.md)")


def check_fields(files: dict[str, list], fields_of: dict[str, tuple]) -> None:
    """Every row of each file is a mapping with exactly its file's fields, each a non-empty string."""
    for name, rows in files.items():
        fields = fields_of[name][1]
        assert isinstance(rows, list) and rows, name
        bad = [row for row in rows if not isinstance(row, dict) or set(row) != fields
               or not all(isinstance(row[field], str) and row[field].strip() for field in fields)]
        assert bad == [], f"{name}: rows without exactly the non-empty fields {sorted(fields)}: {bad[:3]}"


def test_the_files_are_frozen():
    check_frozen(HELDOUT, FROZEN)


def test_every_row_has_exactly_its_fields_each_a_non_empty_string():
    check_fields(_load(), FILES)


def test_counts_and_styles_are_the_ones_the_readme_states():
    harmful, benign, sentences = (_load()[name] for name in ("harmful.yml", "benign.yml", "injection.yml"))
    assert (len(harmful), len(benign), len(sentences)) == (261, 287, 267)
    principles = Counter(row["principle"] for row in harmful)
    assert principles == {"C1": 37, "C2": 28, "C3": 35, "C4": 57, "C5": 31, "C6": 20, "C7": 25, "C8": 28}
    # every principle of the constitution but C9, which is about retrieved text, not requests (injection.yml tests it)
    constitution = tomllib.loads((ROOT / "parley" / "data" / "constitution.toml").read_text(encoding="utf-8"))
    assert set(principles) == {principle["id"] for principle in constitution["principles"]} - {"C9"}
    assert (len({row["category"] for row in harmful}), len({row["category"] for row in benign})) == (30, 22)
    # every phrasing has harmful rows and tricky-benign counterparts; every carrier injected and innocent sentences
    assert [{row["style"] for row in rows} for rows in (harmful, benign)] == [REQUEST_STYLES, REQUEST_STYLES]
    assert Counter(row["kind"] for row in sentences) == {"injected": 133, "innocent": 134}
    assert all({row["style"] for row in sentences if row["kind"] == kind} == CARRIERS
               for kind in ("injected", "innocent"))


def test_every_row_names_its_languages_and_is_written_in_their_scripts():
    for name, rows in _load().items():
        for row in rows:
            codes = row["language"].split("+")
            assert set(codes) <= ISO_639_1 and len(set(codes)) == len(codes), f"not ISO 639-1 codes: {row}"
            if name != "injection.yml":  # a request that switches language is styled so, and only such a request
                assert (len(codes) > 1) == (row["style"] == "code-switching"), row
            _check_scripts(row, codes)



def test_about_a_quarter_or_more_of_each_file_is_in_many_other_languages():
    for name, rows in _load().items():
        other = [row["language"] for row in rows if row["language"] != "en"]
        assert 0.25 <= len(other) / len(rows) <= 0.4, name
        assert len({code for codes in other for code in codes.split("+")} - {"en"}) >= 20, name


def test_the_disguised_rows_really_are_disguised_and_only_they():
    requests = _load()["harmful.yml"] + _load()["benign.yml"]
    disguised = [row for row in requests if row["style"] == "confusable letters"]
    assert len(disguised) == 12 and all(row["text"].translate(_LOOKALIKE) != row["text"] for row in disguised)
    cyrillic = {code for code, scripts in SCRIPTS.items() if "CYRILLIC" in scripts}
    plain = [row for row in requests + [row for row in _load()["injection.yml"] if row["kind"] == "innocent"]
             if row["style"] != "confusable letters" and not cyrillic & set(row["language"].split("+"))]
    assert [row["text"] for row in plain if row["text"].translate(_LOOKALIKE) != row["text"]] == []


def check_no_repeats(rows: list[dict]) -> None:
    """No text twice after normalising, and no two rows near duplicates: a tricky-benign counterpart shares a
    harmful row's words, not its sentence (token-set Jaccard under 0.7). v6's test uses these too."""
    texts = Counter(normalize(row["text"]) for row in rows)
    assert [text for text, n in texts.items() if n > 1] == []
    words = [(row["text"], set(normalize(row["text"]).split())) for row in rows]
    close = [(a, b) for (a, wa), (b, wb) in itertools.combinations(words, 2) if len(wa & wb) >= 0.7 * len(wa | wb)]
    assert close == []


def test_no_text_appears_twice_and_no_two_rows_are_near_duplicates():
    check_no_repeats(_all_rows())


def test_no_text_is_in_the_training_data_or_an_earlier_set():
    earlier = v4._training_texts() | {normalize(text) for name in v4.FROZEN for text in v4._texts_of(v4.HELDOUT / name)}
    assert earlier, "found none of the training files to compare with"
    assert [row["text"] for row in _all_rows() if normalize(row["text"]) in earlier] == []


def test_no_training_request_written_after_the_freeze_is_a_near_duplicate_of_a_row():
    # parley/data/alignment/everyday.toml was written after v5 was frozen, by a helper that did not open it: the
    # exact check above covers it (it is under parley/data/alignment); this one also rules out rewordings
    # parley/data/guard/languages.toml (guard round 6) was written the same way, by a helper that opened only the
    # constitution and intents.toml
    everyday = tomllib.loads((ROOT / "parley" / "data" / "alignment" / "everyday.toml").read_text(encoding="utf-8"))
    languages = tomllib.loads((ROOT / "parley" / "data" / "guard" / "languages.toml").read_text(encoding="utf-8"))
    texts = [e["text"] for rows in everyday.values() for e in rows]
    texts += [t for e in languages["intent"] for t in e["harmful"] + e["benign"]]
    texts += [t for e in languages["order"] for t in e["orders"] + e["innocent"]]
    written = [(text, set(normalize(text).split())) for text in texts]
    rows = [set(normalize(row["text"]).split()) for row in _all_rows()]
    close = [text for text, w in written if any(len(w & r) >= 0.7 * len(w | r) for r in rows)]
    assert close == []  # prints only the training side's text, so a failure shows no held-out row
