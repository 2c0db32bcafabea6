"""The held-out intent set stays held out: no line near-duplicates a training example, and the
set is the one the figures in benchmarks/RESULTS.md were measured on."""

import hashlib
import importlib.util
from pathlib import Path

from parley.pipeline.nlu import DEFAULT_INTENTS, load_intents

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# sha256 of benchmarks/data/intents_heldout.yml as measured in RESULTS.md ("held out, pruned"):
# change the set only deliberately, then rerun benchmarks/intents.py and update both.
HELDOUT_SHA256 = "d6cc2fe3a90dbfd4ee5e416dfaa92ccc360abe096d75b421c5c43c10c1f167c5"


def _overlap():
    spec = importlib.util.spec_from_file_location("heldout_overlap", BENCHMARKS / "heldout_overlap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_heldout_line_is_near_a_training_line():
    from parley.pipeline.embed import Embedder

    # its own embedder: the shared one remembers recent vectors, and these (from one big batch) differ
    # in the last bits from what other tests compute, enough to move a borderline intent in test_nlu
    embedder = Embedder.load()
    overlap = _overlap()
    heldout = overlap.heldout_lines(overlap.HELDOUT)
    training = [text for intent in load_intents(DEFAULT_INTENTS) for text in intent.examples]
    best, index = overlap.nearest(heldout, training, embedder)
    too_close = [f"{best[i]:.3f} {heldout[i]!r} ~ {training[index[i]]!r}"
                 for i in range(len(heldout)) if best[i] > overlap.HELDOUT_MAX_COSINE]
    assert not too_close, (f"held-out lines above cosine {overlap.HELDOUT_MAX_COSINE} to a training line "
                           f"(run benchmarks/heldout_overlap.py): {too_close}")
    assert len(heldout) > 100 and best.max() > 0.5  # the comparison ran on real vectors


def test_heldout_set_is_the_measured_one():
    digest = hashlib.sha256((BENCHMARKS / "data" / "intents_heldout.yml").read_bytes()).hexdigest()
    assert digest == HELDOUT_SHA256, ("benchmarks/data/intents_heldout.yml changed: if deliberately, rerun "
                                      "benchmarks/intents.py, update RESULTS.md, the README and this hash")
