"""Data files a user names on the command line, damaged on purpose: the NLU's intents YAML, the guard's
data folder, the alignment requests TOML, pairs and prompts JSONL, the ASR stage's text file and the web
fetcher's ca_file. A pipe or a link to /dev/zero in place of a file, a folder, deep nesting, invalid UTF-8,
keys written twice, fields of the wrong type. Each gets a clear error naming the file (and the line, where
there are lines) before any model loads, instead of a hang, a traceback or silent wrong training."""

import json
import os
from pathlib import Path

import pytest

from parley.pipeline.nlu import IntentsError, load_intents

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
