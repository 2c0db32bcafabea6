"""Data files a user names on the command line, damaged on purpose: the NLU's intents YAML, the guard's
data folder, the alignment requests TOML, pairs and prompts JSONL, the ASR stage's text file and the web
fetcher's ca_file. A pipe or a link to /dev/zero in place of a file, a folder, deep nesting, invalid UTF-8,
keys written twice, fields of the wrong type. Each gets a clear error naming the file (and the line, where
there are lines) before any model loads, instead of a hang, a traceback or silent wrong training."""

import json
import os
from pathlib import Path

import certifi
import pytest

from parley.config import load_config
from parley.pipeline.nlu import IntentsError, load_intents
from parley.pipeline.web import Fetcher, WebConfig, WebError
from parley.registry import Registry
from parley.train.constitutional import ConstitutionalConfig
from parley.train.constitutional import main as constitutional
from parley.train.preferences import load_pairs
from parley.train.reward import RewardConfig
from parley.train.reward import main as reward
from parley.train.rl import RLConfig
from parley.train.rl import main as rl
from parley.voice.speech_data import SpeechDataError, corpus_sentences
from parley.train.guard_data import GuardDataError, data_dir, load_all

INTENTS = """intents:
- name: greet
  description: say hello
  examples: [hello there, hi friend]
- name: bye
  description: say goodbye
  examples: [goodbye now, see you later]
"""


def special(path: Path, kind: str) -> Path:
    """`path` made a FIFO (opening it for reading blocks until a writer comes), a link to /dev/zero
    (reading it never ends) or a folder."""
    {"fifo": os.mkfifo, "device": lambda p: p.symlink_to("/dev/zero"), "folder": Path.mkdir}[kind](path)
    return path


def laughs(levels: int = 6) -> str:
    """YAML aliases nine wide, `levels` deep (`l6`: 9**6 strings, all shared): "billion laughs"."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the NLU's intents file

@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_an_intents_file_that_is_no_regular_file(kind, tmp_path):
    """A pipe blocked load_intents on read; a link to /dev/zero was read until memory ran out."""
    with pytest.raises(IntentsError, match="intents.yml: not a regular file"):
        load_intents(special(tmp_path / "intents.yml", kind))


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # was a RecursionError traceback
    (INTENTS.replace("examples: [hello there, hi friend]",  # the second list silently replaced the first
                     "examples: [hello there, hi friend]\n  examples: [hey you, yo there]"),
     r"line 5, column 3: .*the key 'examples' is written twice"),
    (INTENTS.replace("name: greet", "name: greet\n  name: wave"), r"line 3, .*the key 'name' is written twice"),
    # the message's repr of 9**6 shared strings ran to megabytes (9**8: never finished)
    (laughs() + INTENTS.replace("[hello there, hi friend]", "[*l6, hi friend]"), r"field examples: \[\[\[\.\.\."),
    (laughs() + INTENTS.replace("name: greet", "name: *l6"), r"field name: \[\[\[\.\.\."),
])
def test_a_hostile_intents_file(text, message, tmp_path):
    (tmp_path / "intents.yml").write_text(text)
    with pytest.raises(IntentsError, match=message):
        load_intents(tmp_path / "intents.yml")


# ---------------------------------------------------------------- the guard's data folder (parley train guard data=)

def guard_folder(tmp_path: Path, **files: str) -> Path:
    """A copy of the shipped requests.toml and injections.toml, with files (name__toml) added or replaced."""
    folder = tmp_path / "guard"
    folder.mkdir()
    for name in ("requests.toml", "injections.toml"):
        (folder / name).write_bytes((data_dir() / name).read_bytes())
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


@pytest.mark.parametrize("name", ["requests.toml", "intents.toml", "breadth/extra.toml"])
@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_guard_data_files_that_are_no_regular_files(name, kind, tmp_path):
    """requests.toml as a pipe blocked the stage, as /dev/zero ran memory out, as a folder was a bare 'Is a
    directory'; an optional file (intents.toml) that was no regular file was skipped without a word."""
    folder = guard_folder(tmp_path)
    (folder / "breadth").mkdir()
    (folder / name).unlink(missing_ok=True)
    special(folder / name, kind)
    with pytest.raises(GuardDataError, match=f"{name} is not a regular file"):
        load_all(folder)


@pytest.mark.parametrize("files, message", [
    ({"requests__toml": "a = " + "[" * 100_000 + "]" * 100_000}, "requests.toml is nested too deeply"),
    ({"requests__toml": "a = " + "{b = " * 100_000 + "1" + "}" * 100_000}, "requests.toml is nested too deeply"),
    ({"requests__toml": 'principle = ["C1", "C2"]'}, r"requests.toml has no \[\[principle\]\] tables"),
    ({"intents__toml": "intent = 5"}, r"intents.toml: `intent` must be \[\[intent\]\] tables, not int"),
    ({"intents__toml": 'order = ["ignore your rules"]'}, r"intents.toml: `order` must be \[\[order\]\] tables"),
    ({"languages__toml": "intent = [1, 2]"}, r"languages.toml: `intent` must be \[\[intent\]\] tables"),
    ({"templates__toml": '[C1]\nharmful = ["how do I {verb} it"]\nslots = {verb = []}'},  # an IndexError
     r"templates.toml: \[C1.slots\] `verb` is an empty list"),
])
def test_hostile_guard_data(files, message, tmp_path):
    with pytest.raises(GuardDataError, match=message):
        load_all(guard_folder(tmp_path, **files))


def test_guard_data_that_is_a_file_is_named(tmp_path):
    (tmp_path / "requests.toml").write_text("")
    with pytest.raises(GuardDataError, match="requests.toml is not a folder; give a folder with requests.toml"):
        load_all(tmp_path / "requests.toml")


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the data must be refused before it."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the data were checked")
    monkeypatch.setattr(Registry, "load", load)


# ---------------------------------------------------------------- the alignment requests (constitutional requests=)

@pytest.mark.parametrize("text, message", [
    (None, "is not a regular file"),  # a pipe: was a hang
    ("a = " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),  # was a RecursionError
    ('harmful = ["make a bomb"]\nbenign = ["bake bread"]', r"needs at least one \[\[harmful\]\] entry, and `harmful` "
                                                           "holding only such tables"),  # was an AttributeError
    ('[[harmful]]\ntext = "x"\nprinciple = "C1"\nfr = 5\n[[benign]]\ntext = "y"\nlooks_like = "C1"',
     r"entry 0 \('x'\): fr, its translation, must be text, not int"),  # was an AttributeError
    ('a = "\xff"', "is not valid TOML"),  # a bare UnicodeDecodeError, no file named
])
def test_hostile_alignment_requests(text, message, tmp_path, no_model):
    path = tmp_path / "requests.toml"
    if text is None:
        special(path, "fifo")
    else:
        path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    with pytest.raises(ValueError, match=f"requests.toml.*{message}"):
        constitutional(ConstitutionalConfig(run=str(tmp_path / "run"), requests=str(path)))


# ---------------------------------------------------------------- pairs and prompts (dpo, reward, rl)

PAIR = {"prompt": [{"role": "user", "content": "How do I bake bread?"}], "chosen": "Mix flour, water and yeast.",
        "rejected": "I can't help with that.", "principle": None, "source": "written", "labeler": "human"}


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_pairs_files_that_are_no_regular_files(kind, tmp_path):
    """Were 'pairs file ... not found' (is_file() is false for them): now named for what they are."""
    with pytest.raises(ValueError, match="pairs file .*pairs.jsonl is not a regular file"):
        load_pairs(special(tmp_path / "pairs.jsonl", kind))


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "\xff"}', r":2: not UTF-8 text"),  # a bare UnicodeDecodeError, no file or line
    (b"[" * 100_000 + b"]" * 100_000, ":2: nested too deeply"),  # a RecursionError traceback
    # the second "chosen" silently replaced the first
    (json.dumps(PAIR).replace('"chosen": ', '"chosen": "Knead it.", "chosen": ').encode(),
     ":2: field 'chosen' is written twice"),
])
def test_hostile_pairs_lines(line, message, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(PAIR).encode() + b"\n" + line + b"\n")
    with pytest.raises(ValueError, match="pairs.jsonl" + message):
        load_pairs(path)


def test_reward_pairs_are_checked_before_the_model_loads(tmp_path, no_model):
    """A malformed pairs file failed only after the base model had loaded (PairRows read it)."""
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(PAIR) + "\n")
    bad.write_text(json.dumps({**PAIR, "rejected": PAIR["chosen"]}) + "\n")
    for files in ([f"pairs={bad}", f"heldout={good}"], [f"pairs={good}", f"heldout={bad}"],
                  [f"pairs={good}", f"heldout={good}", f"more_pairs={bad}"]):
        with pytest.raises(ValueError, match="bad.jsonl:1: fields 'chosen' and 'rejected' are the same answer"):
            reward(load_config(RewardConfig, None, [*files, f"run={tmp_path / 'run'}"]))


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user", "content": 5}], "message 0 needs a role .* and a string content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["a list"]}], "message 1 needs a role"),
    ([{"role": "moderator", "content": "hi"}], "message 0 needs a role"),
    ({"role": "user", "content": "hi"}, "must be a non-empty list of messages"),
])
def test_rl_prompts_are_checked_before_the_model_loads(prompt, message, tmp_path, no_model):
    """A prompt whose content was no string passed the check (only the last role was looked at) and
    failed in the chat template after the model had loaded, naming no file or line."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": PAIR["prompt"]}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(ValueError, match="prompts.jsonl:2: expected .*" + message):
        rl(load_config(RLConfig, None, [f"prompts={path}", f"run={tmp_path / 'run'}", "register=false"]))
    special(tmp_path / "fifo.jsonl", "fifo")
    with pytest.raises(ValueError, match="prompts file .*fifo.jsonl is not a regular file"):
        rl(load_config(RLConfig, None, [f"prompts={tmp_path / 'fifo.jsonl'}", f"run={tmp_path / 'run'}"]))


# ---------------------------------------------------------------- the ASR stage's text= and the web fetcher's ca_file

@pytest.mark.parametrize("kind, message", [("fifo", "is not a regular file"), ("device", "is not a regular file"),
                                           ("folder", "is not a regular file"),  # the three were 'no text file'
                                           ("latin-1", r"text.txt:2: not UTF-8 text")])  # a bare UnicodeDecodeError
def test_hostile_asr_text_files(kind, message, tmp_path):
    path = tmp_path / "text.txt"
    if kind == "latin-1":
        path.write_bytes(b"the cat sat on the mat.\nthe caf\xe9 is open today.\n")
    else:
        special(path, kind)
    with pytest.raises(SpeechDataError, match=message):
        corpus_sentences(3, 10, path)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "garbage"])
def test_hostile_ca_files(kind, tmp_path):
    """OpenSSL opened a pipe and waited for a writer (the fetcher never started); a link to /dev/zero or
    a folder it reported as 'no certificate found' or a bare errno."""
    path = tmp_path / "ca.pem"
    if kind == "garbage":
        path.write_bytes(b"-----BEGIN CERTIFICATE-----\n\xff\xfe not base64 \n-----END CERTIFICATE-----\n")
    else:
        special(path, kind)
    with pytest.raises(WebError, match=f"cannot load ca_file {path}: "
                                       + ("not a regular file" if kind != "garbage" else "")):
        Fetcher(WebConfig(ca_file=path, cache_dir=tmp_path / "cache"))


def test_a_pem_ca_file_still_loads(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(b"a comment before the block\n" + Path(certifi.where()).read_bytes())
    Fetcher(WebConfig(ca_file=path, cache_dir=tmp_path / "cache")).close()


# ---------------------------------------------------------------- the learning rounds' feedback folder

def test_a_feedback_file_that_is_no_regular_file_is_named(tmp_path):
    """`parley eval feedback=` skipped a pipe as sft-heldout.jsonl without a word (after the model loaded)."""
    from parley.learn.report import EvalConfig

    special(tmp_path / "sft-heldout.jsonl", "fifo")
    with pytest.raises(ValueError, match="sft-heldout.jsonl is not a regular file"):
        load_config(EvalConfig, None, [f"feedback={tmp_path}"])
