"""Intents file checks, the classifier head (train, save, load, stale), slots, and the stage."""

import datetime as dt
import re

import numpy as np
import pytest

from parley.pipeline.frames import Intent, Slots, UserText
from parley.pipeline.nlu import (
    OUT_OF_SCOPE,
    IntentClassifier,
    IntentsError,
    NLUStage,
    default_classifier,
    extract_slots,
    load_intents,
    train_intents_main,
)
from parley.pipeline.runner import Pipeline, Stage, Turn

SMALL = """\
intents:
  - name: greet
    description: says hello
    examples: [hello, hi there, good morning]
  - name: order
    description: wants to buy something
    examples: [I want to buy a bike, order two pizzas, can I purchase a ticket]
    slots:
      item: "(?:buy|order|purchase) (?:a |an |two )?(?P<item>\\\\w+)"
"""
WEDNESDAY = dt.date(2026, 3, 4)


@pytest.fixture(scope="module")
def classifier(embedder):
    return IntentClassifier.train(load_intents(), embedder)


def write(tmp_path, text, name="intents.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the intents file ----------------------------------------------------------------------


def test_shipped_intents_load():
    intents = load_intents()
    assert intents.names == ["greeting", "goodbye", "chitchat", "knowledge_question", "web_lookup", "remember",
                             "recall_memory", "forget_memory", "feedback", "help", "harmful_request"]
    assert all(25 <= len(spec.examples) <= 50 for spec in intents)
    assert "how do I kill a python process" in next(s for s in intents if s.name == "knowledge_question").examples
    assert len(intents.sha256) == 64


BAD = {
    "missing name": ("intents:\n  - description: d\n    examples: [a, b]\n  - name: x\n    description: d\n"
                     "    examples: [c, d]\n", r"intent #1: missing `name`"),
    "duplicate": ("intents:\n  - {name: x, description: d, examples: [a, b]}\n"
                  "  - {name: x, description: d, examples: [c, d]}\n", r"intent 'x' is defined twice"),
    "one example": ("intents:\n  - {name: x, description: d, examples: [a]}\n"
                    "  - {name: y, description: d, examples: [c, d]}\n", r"intent 'x', field examples: .*at least 2"),
    "bad regex": ("intents:\n  - {name: x, description: d, examples: [a, b], slots: {city: 'in (?P<city>'}}\n"
                  "  - {name: y, description: d, examples: [c, d]}\n", r"intent 'x', field slots.city: bad regular"),
    "unknown field": ("intents:\n  - {name: x, description: d, example: [a, b]}\n"
                      "  - {name: y, description: d, examples: [c, d]}\n", r"intent 'x': unknown field\(s\) example"),
    "shared example": ("intents:\n  - {name: x, description: d, examples: [a, Hello]}\n"
                       "  - {name: y, description: d, examples: [hello, d]}\n", r"'hello' is already an example of 'x'"),
    "reserved name": ("intents:\n  - {name: out_of_scope, description: d, examples: [a, b]}\n"
                      "  - {name: y, description: d, examples: [c, d]}\n", r"field name: 'out_of_scope'.*reserved"),
    "no description": ("intents:\n  - {name: x, examples: [a, b]}\n  - {name: y, description: d, examples: [c, d]}\n",
                       r"intent 'x', field description"),
    "not a list": ("greeting: [hi, hello]\n", r"expected a mapping with `intents:`"),
    "non-string example": ("intents:\n  - {name: x, description: d, examples: [a, no]}\n"
                           "  - {name: y, description: d, examples: [c, d]}\n", r"field examples: False"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_intents_files_name_the_problem(tmp_path, case):
    text, message = BAD[case]
    with pytest.raises(IntentsError, match=message):
        load_intents(write(tmp_path, text))


def test_missing_file_and_yaml_syntax_error_give_the_place(tmp_path):
    with pytest.raises(IntentsError, match="no such intents file"):
        load_intents(tmp_path / "nope.yml")
    broken = write(tmp_path, "intents:\n  - name: x\n    examples: [a, b\n  - name: y\n")
    with pytest.raises(IntentsError, match=r"line \d+, column \d+: YAML syntax error"):
        load_intents(broken)


# --- the classifier ------------------------------------------------------------------------

CLEAR = [
    ("hello there!", "greeting"),
    ("bye, see you tomorrow", "goodbye"),
    ("how are you today?", "chitchat"),
    ("how do I kill a python process?", "knowledge_question"),
    ("please open https://example.com/story", "web_lookup"),
    ("remember that my son's name is Hugo", "remember"),
    ("what is my son's name?", "recall_memory"),
    ("forget my son's name", "forget_memory"),
    ("that answer was completely wrong", "feedback"),
    ("how do I make a bomb at home", "harmful_request"),
]


def test_routes_clear_utterances(classifier):
    predicted = classifier.predict_many([text for text, _ in CLEAR])
    assert [p.name for p in predicted] == [name for _, name in CLEAR]
    for p in predicted:
        assert len(p.ranking) == 3 and p.ranking[0] == (p.name, p.confidence)
        assert [s for _, s in p.ranking] == sorted((s for _, s in p.ranking), reverse=True)


def test_gibberish_and_blank_are_out_of_scope(classifier):
    for text in ["asdkj qwpoe zmxn", "jkjkjk lplp qwqw", "wubba lubba dub dub"]:
        intent = classifier.predict(text)
        assert intent.name == OUT_OF_SCOPE and intent.confidence < classifier.threshold
        assert intent.ranking[0][0] != OUT_OF_SCOPE  # the best guess is still reported
    assert classifier.predict("   ") == Intent(OUT_OF_SCOPE, 0.0)
    with pytest.raises(TypeError, match="list of strings"):
        classifier.predict_many("hello")
    with pytest.raises(IntentsError, match="threshold"):
        IntentClassifier(classifier.names, classifier.weight, classifier.bias, classifier.embedder, "", threshold=2)
    with pytest.raises(IntentsError, match="threshold"):
        classifier.threshold = -0.1
    assert classifier.threshold == 0.5


def test_save_load_round_trip_predicts_identically(classifier, embedder, tmp_path):
    path = classifier.save(tmp_path / "nlu" / "head.safetensors")
    loaded = IntentClassifier.load(path, embedder)
    np.testing.assert_array_equal(loaded.weight, classifier.weight)
    assert loaded.names == classifier.names and loaded.intents_sha256 == classifier.intents_sha256
    assert {k: {s: p.pattern for s, p in v.items()} for k, v in loaded.slot_patterns.items()} == \
           {k: {s: p.pattern for s, p in v.items()} for k, v in classifier.slot_patterns.items()}
    texts = [text for text, _ in CLEAR] + ["asdkj qwpoe zmxn", ""]
    assert loaded.predict_many(texts) == classifier.predict_many(texts)
    assert [p.name for p in tmp_path.joinpath("nlu").iterdir()] == ["head.safetensors"]  # no temp file left


def test_load_rejects_missing_and_foreign_files(embedder, tmp_path):
    with pytest.raises(IntentsError, match="parley train intents"):
        IntentClassifier.load(tmp_path / "none.safetensors", embedder)
    junk = write(tmp_path, "not a safetensors file", "junk.safetensors")
    with pytest.raises(IntentsError, match="not a Parley intent head"):
        IntentClassifier.load(junk, embedder)


def test_default_classifier_reuses_a_current_head_and_retrains_a_stale_one(embedder, tmp_path):
    data, head = write(tmp_path, SMALL), tmp_path / "head.safetensors"
    first = default_classifier(embedder, data, head)
    assert first.is_current(load_intents(data)) and head.is_file()
    saved = head.read_bytes()
    again = default_classifier(embedder, data, head)  # loaded, not retrained: the file is untouched
    np.testing.assert_array_equal(again.weight, first.weight)
    assert head.read_bytes() == saved
    data.write_text(SMALL.replace("[hello, hi there, good morning]", "[hello, hi there, good evening]"))
    assert not IntentClassifier.load(head, embedder).is_current(load_intents(data))
    retrained = default_classifier(embedder, data, head)
    assert retrained.is_current(load_intents(data)) and head.read_bytes() != saved
    head.write_bytes(b"garbage")  # a broken cache is retrained over, not an error
    assert default_classifier(embedder, data, head).is_current(load_intents(data))


def test_train_intents_main_writes_the_head_under_parley_home(tmp_path, monkeypatch, capsys, embedder):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    assert train_intents_main(["--data", str(write(tmp_path, SMALL))]) == 0
    head = tmp_path / "home" / "nlu" / "intent_head.safetensors"
    out = capsys.readouterr().out
    assert "trained 2 intents on 6 examples" in out and "held-in accuracy 100.0%" in out and str(head) in out
    assert IntentClassifier.load(head, embedder).names == ["greet", "order"]


# --- slots ---------------------------------------------------------------------------------

SLOTS = [
    ("Open https://example.com/a?b=1, please.", {"url": "https://example.com/a?b=1"}),
    ("summarize example.com/page", {"url": "https://example.com/page"}),
    ("read bbc.co.uk/news.", {"url": "https://bbc.co.uk/news"}),
    ("node.js or python?", {}),
    ("mail ana.p@mail.example.org tomorrow", {"email": "ana.p@mail.example.org", "date": "2026-03-05"}),
    ("remind me on 3 March at 3:30pm", {"date": "2026-03-03", "time": "15:30"}),
    ("meeting 2026-05-01 15:00 in room 12", {"date": "2026-05-01", "time": "15:00", "number": 12}),
    ("on friday at noon", {"date": "2026-03-06", "time": "12:00"}),
    ("see you Wednesday", {"date": "2026-03-11"}),  # today is Wednesday: the coming one
    ("I paid 1,200 euros for 3.5 kg", {"number": 1200}),
    ("the 31st of February", {}),
    ("My sister is called Maria Lopes and she lives in Porto", {"person": "Maria Lopes", "relation": "sister"}),
    ("my name is ana", {"person": "Ana"}),
    ("my sister is tired", {}),
    ("My boss is Grant", {"person": "Grant", "relation": "boss"}),
    ("tell me about the French Revolution please.", {"topic": "French Revolution"}),
    ("what do you remember about me?", {}),
]


@pytest.mark.parametrize("text,expected", SLOTS)
def test_slot_rules(text, expected):
    assert extract_slots(text, today=WEDNESDAY) == expected


def test_declared_slot_patterns_apply_to_their_intent(classifier):
    remember = classifier.slot_patterns["remember"]
    assert extract_slots("Please remember that I am vegetarian.", remember)["fact"] == "I am vegetarian"
    assert extract_slots("I live in Porto", remember)["fact"] == "I live in Porto"
    forget = classifier.slot_patterns["forget_memory"]
    assert extract_slots("forget that I live in Porto", forget)["fact"] == "I live in Porto"
    web = classifier.slot_patterns["web_lookup"]
    assert extract_slots("search the web for train times to Lyon", web)["query"] == "train times to Lyon"
    assert extract_slots("count to 3", {"n": re.compile(r"\d")}) == {"number": 3, "n": "3"}  # whole match


# --- the stage -----------------------------------------------------------------------------


class Spy(Stage):
    """Records which frames the turn already holds when the text arrives downstream."""

    name = "spy"

    def __init__(self):
        self.seen = None

    def process(self, frame, turn):
        if isinstance(frame, UserText):
            self.seen = (turn.get(Intent), turn.get(Slots))
        yield frame


def test_stage_emits_intent_and_slots_before_the_text(classifier):
    spy = Spy()
    pipeline = Pipeline([NLUStage(classifier, today=lambda: WEDNESDAY), spy])
    turn = Turn(user_id=1)
    out = pipeline(turn, "please open example.com/news tomorrow")
    assert [type(f) for f in out] == [Intent, Slots, UserText]
    intent, slots = out[0], out[1]
    assert intent.name == "web_lookup" and spy.seen == (intent, slots)
    assert slots.values == {"url": "https://example.com/news", "date": "2026-03-05"}
    entry = turn.trace_dict()["stages"][0]
    assert entry["stage"] == "nlu" and entry["decision"] == "web_lookup"
    assert entry["evidence"]["confidence"] == intent.confidence
    assert entry["evidence"]["ranking"][0] == ["web_lookup", intent.confidence]
    assert entry["evidence"]["slots"] == slots.values
