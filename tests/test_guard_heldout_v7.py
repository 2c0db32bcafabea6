"""The guard's seventh held-out set is frozen, well formed, labelled by language, free of near-duplicates, and shares
no text (nor a near copy of one) with the guard's or the alignment work's training data, nor with the earlier held-out
sets (v1, v3, v4, v5 and v6; v6 has been looked at and is becoming training data).

benchmarks/data/guard_heldout_v7/ was written by three helpers that read neither that data nor the rules that use it,
nor the earlier sets' data files (see the README there). The overlap checks below read those files only
programmatically, and a failure names only v7 rows, never the text they collide with.
"""

import functools
from pathlib import Path

import pytest

import test_guard_heldout as v1
import test_guard_heldout_v3 as v3
import test_guard_heldout_v4 as v4
import test_guard_heldout_v5 as v5
import test_guard_heldout_v6 as v6
from test_guard_heldout_v3 import normalize  # the same comparison as v3 to v6 (tested in v3)

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "benchmarks" / "data" / "guard_heldout_v7"
# The sha256 of each file, taken when the set was frozen (2026-12-07, 07:40 UTC), before any guard or aligned model
# was evaluated on it. A hash is never changed to make a test pass: a changed set is a new set (v8), said so in
# benchmarks/RESULTS.md.
FROZEN = {"harmful.yml": "92a0b734c7f481a68db04bd518495af368e255650fc27af9e2fe9d2269152d10",
          "benign.yml": "093995be594abd7bb0cca6deeb907d344385b70f1127fa61b3e5e5ca56080b29",
          "injection.yml": "7e48a31666468267dd1b92ec79a342922ebfb35d19077737998d16f8872eadbb"}
# v5's and v6's files and fields (a language on every row), request styles, carriers, language codes and scripts,
# checked by v6's functions
FILES = v5.FILES
# the earlier held-out sets, all of whose strings and lines are compared with v7 (v6 is becoming training data)
EARLIER_SETS = (v1.HELDOUT, v3.HELDOUT, v4.HELDOUT, v5.HELDOUT, v6.HELDOUT)


@functools.cache
def _load():
    """Each file's list of rows, read once (test_every_row_has_exactly_its_fields checks their shape)."""
    return v6.load(HELDOUT)


def _all_rows():
    return [row for rows in _load().values() for row in rows]


def test_the_files_are_frozen():
    v5.check_frozen(HELDOUT, FROZEN)


def test_every_row_has_exactly_its_fields_each_a_non_empty_string():
    v5.check_fields(_load(), FILES)


def test_counts_and_styles_are_the_ones_the_readme_states():
    v6.check_counts(_load(), (202, 250, 193),
                    {"C1": 29, "C2": 24, "C3": 25, "C4": 40, "C5": 25, "C6": 17, "C7": 20, "C8": 22},
                    (30, 27), [114, 164], {"injected": 93, "innocent": 100})


def test_every_row_names_its_languages_and_is_written_in_their_scripts():
    v6.check_languages(_load())


def test_about_a_third_of_each_file_is_in_many_other_languages():
    v6.check_a_third_in_other_languages(_load(), 27)


def test_the_disguised_rows_really_are_disguised_and_only_they():
    v6.check_disguised(_load(), 9)


def test_no_text_appears_twice_and_no_two_rows_are_near_duplicates():
    v5.check_no_repeats(_all_rows())


def test_no_text_is_in_the_training_data_or_an_earlier_set():
    earlier = v6.earlier_texts(EARLIER_SETS)
    assert len(earlier) > 10000, "found too few of the training files and earlier sets to compare with"
    assert [row["text"] for row in _all_rows() if normalize(row["text"]) in earlier] == []  # prints only v7 rows


@pytest.mark.slow  # 7-9 s on 2 cores; .ci/run runs it (--runslow)
def test_no_text_is_a_near_duplicate_of_the_training_data_or_an_earlier_set():
    # token-set Jaccard >= 0.7 with any string of the training data or of v1, v3, v4, v5, v6 (v6 is training data now)
    v6.check_not_near(_all_rows(), v6.earlier_texts(EARLIER_SETS))
