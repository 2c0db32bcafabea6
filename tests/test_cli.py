"""The `parley` command end to end, in subprocesses with their own PARLEY_HOME: importing,
listing, exporting, generating, chatting through a pipe, and one-line errors for bad input
(most of those run in this process: a subprocess spends seconds importing torch)."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import typing
import warnings
from dataclasses import MISSING, fields, is_dataclass
from unittest.mock import patch

import pytest
import torch

from parley.cli import COMMANDS, load_settings, parse_args, settings_class
from parley.config import to_dict
from parley.pipeline.assistant import AssistantConfig


def parley(home, *args, stdin=None, check=True):
    env = {**os.environ, "PARLEY_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "parley", *args], input=stdin, capture_output=True,
                            text=True, env=env, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"parley {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def parley_here(home, *args) -> subprocess.CompletedProcess:
    """`parley ARGS` run by `parley.cli.main` in this process, as `parley` (the subprocess) would
    exit and print: its exit status, stdout and stderr. The warnings a fresh interpreter prints
    (its default filters: not the deprecations of libraries) count as lines on stderr. Output written
    to a stream bound at import (users_main's `out=sys.stdout`) escapes it: use `parley` for those."""
    from parley.cli import main

    out, err = io.StringIO(), io.StringIO()
    with patch.dict(os.environ, {"PARLEY_HOME": str(home)}), warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("default")
        for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", quiet)
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    printed = "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
    return subprocess.CompletedProcess(["parley", *args], code, out.getvalue(), err.getvalue() + printed)


def assert_clean_error(result, *fragments):
    """Exit status 2, exactly one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parley: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_hf_dir):
    home = tmp_path_factory.mktemp("home")
    out = parley(home, "models", "import", str(tiny_hf_dir), "--name", "tiny")
    assert "imported tiny" in out.stdout
    return home


def test_list_shows_imported_model(home):
    out = parley(home, "models", "list").stdout
    assert out.startswith("tiny") and "LlamaForCausalLM" in out


def test_generate_is_deterministic_and_prints_only_the_continuation(home):
    args = ("generate", "--model", "tiny", "--prompt", "The capital of France is", "--max-tokens", "12")
    # each the same in a second process: this one (a third interpreter costs seconds of imports)
    first, second = parley(home, *args).stdout, parley_here(home, *args).stdout
    assert first == second and "The capital" not in first and first.strip()
    seeded = [run(home, *args, "--temperature", "1.0", "--seed", "4", "--engine.dtype", "float32").stdout
              for run in (parley, parley_here)]
    assert seeded[0] == seeded[1]


def test_chat_reads_turns_from_a_pipe(home):
    out = parley(home, "chat", "model=tiny", "max_tokens=8", "temperature=0",
                 stdin="hello there\n/help\n/reset\nhow are you?\n/exit\nnever read\n").stdout
    first_answer, rest = out.split("commands:")
    assert first_answer.endswith("\n\n")  # each answer ends with a blank line
    assert "/reset" in rest and "(new conversation)\n" in rest
    assert rest.split("(new conversation)\n")[1].endswith("\n\n")  # the second answer; /exit ends it


def test_export_loads_in_transformers(home, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parley.registry import Registry

    parley(home, "models", "export", "tiny", str(tmp_path / "out"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    model, tok, _ = Registry(home).load("tiny")
    ids = tok.encode("Hello there, café 東京")
    assert hf_tok("Hello there, café 東京")["input_ids"] == ids
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, model(torch.tensor([ids])), atol=1e-4, rtol=0)


def test_bad_input_gives_one_line_errors(home, tiny_hf_dir, tmp_path):
    # as the command runs, in a subprocess (a fresh interpreter's imports print nothing more); serve too:
    # a server that started by mistake would hang this process
    assert_clean_error(parley(home, "models", "import", str(tmp_path / "nope"), check=False), "no such file")
    assert_clean_error(parley(home, "serve", "--prot", "8000", check=False),
                       "unknown config key 'prot' (did you mean port?)")
    assert_clean_error(parley(home, "serve", "engine.max_batch=0", check=False), "engine: max_batch must be >= 1")
    # the rest in this process, through parley.cli.main as the command calls it
    assert_clean_error(parley_here(home, "generate", "--model", "ghost", "--prompt", "hi"),
                       "no model named 'ghost'")
    assert_clean_error(parley_here(home, "models", "import", str(tiny_hf_dir), "--name", "tiny"),
                       "already exists")
    long_prompt = "Paris " * 200  # the tiny model's context is 96 tokens
    assert_clean_error(parley_here(home, "generate", "--model", "tiny", "--prompt", long_prompt),
                       "context is 96 tokens")
    assert_clean_error(parley_here(home, "generate", "--model", "tiny", "--prompt", "hi", "--temperature", "-1"),
                       "temperature")
    assert_clean_error(parley_here(home, "chat", "model=ghost"), "no model named 'ghost'")
    assert_clean_error(parley_here(home, "chat", "temprature=0"), "temprature", "temperature")
    assert_clean_error(parley_here(home, "ingest", str(tmp_path / "nope.txt")), "no such file")
    assert_clean_error(parley_here(home, "generate", "--prompt", "hi", "--max-tokens", "ten"),
                       "max_tokens: expected int, got 'ten'")
    assert_clean_error(parley_here(home, "chat", "--url", "http://127.0.0.1:9"), "server=URL")
    assert_clean_error(parley_here(home, "users", "key"), "parley users key NAME")
    assert_clean_error(parley_here(home, "modles", "list"), "unknown command 'modles' (did you mean models?)")
    assert_clean_error(parley_here(home, "generate", "--model", "tiny", "--prompt", "hi", "engine.kernels=amx",
                                   "engine.dtype=float32"), "kernels=amx, but the AMX tile path cannot run")

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_hf_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_clean_error(parley_here(home, "models", "import", str(truncated)), "corrupt or truncated")

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(200))
    assert_clean_error(parley_here(home, "models", "import", str(garbage)))

    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny_hf_dir, gpt2)
    config = json.loads((gpt2 / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (gpt2 / "config.json").write_text(json.dumps(config))
    assert_clean_error(parley_here(home, "models", "import", str(gpt2)), "GPT2LMHeadModel")
    # nothing half-written was left behind by the failed imports
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny"]


def test_commands_with_their_own_options(home, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("The boiler is serviced every October by Hansen & Sons.")
    out = parley(home, "ingest", "--user", "bob", "--collection", "house", str(note)).stdout
    assert "note.txt: stored 1 chunk" in out and "user 'bob', collection 'house'" in out
    assert "bob" in parley(home, "users", "list").stdout  # (users_main writes to the sys.stdout of its import)
    assert "stages: list[str]" in parley_here(home, "chat", "--help").stdout
    assert "no_auth: bool = False" in parley(home, "serve", "--help").stdout


def _defaults(cls, prefix="", base=None):
    """(dotted key, default) of every setting, from the dataclass fields themselves."""
    for f in fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if base is not None:
            value = getattr(base, f.name)
        else:
            value = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(tp):
            yield from _defaults(tp, f"{prefix}{f.name}.", value)
        else:
            yield prefix + f.name, value


@pytest.mark.parametrize("command, action", [(c, a) for c, actions in COMMANDS.items() for a in actions])
def test_every_command_help_lists_each_key_once_with_its_default(command, action, capsys):
    argv = [command, *([action] if action else []), "--help"]
    with pytest.raises(SystemExit) as done:
        load_settings(parse_args(argv))
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"usage: parley {' '.join(argv[:-1])} ")
    for key, default in _defaults(settings_class(command, action)):
        rows = [line for line in lines if re.match(rf"  {re.escape(key)}( \(|:)", line)]
        assert len(rows) == 1, (key, rows)
        assert ("(required)" if default is MISSING else f" = {to_dict(default)!r}") in rows[0], rows[0]


def test_serve_and_chat_take_the_same_assistant_keys():
    serve = load_settings(parse_args(["serve", "persona=You are Zed.", "--web-search-url", "http://127.0.0.1:8888",
                                      "--self-check", "--engine.max-batch", "1", "--no-auth", "--port=9000",
                                      "max_tokens=20"]))
    assert (serve.persona, serve.web_search_url, serve.self_check, serve.max_tokens) == \
        ("You are Zed.", "http://127.0.0.1:8888", True, 20)
    assert (serve.engine.max_batch, serve.no_auth, serve.port) == (1, True, 9000)
    chat = load_settings(parse_args(["chat", "persona=You are Zed.", "web_search_url=http://127.0.0.1:8888",
                                     "self_check=true", "engine.max_batch=1", "max_tokens=20"]))
    assert serve.assistant() == AssistantConfig(**{f.name: getattr(chat, f.name) for f in fields(AssistantConfig)})
    chat = load_settings(parse_args(["chat", "--server", "http://127.0.0.1:8000", "--api-key", "pk-1"]))
    assert (chat.server, chat.api_key) == ("http://127.0.0.1:8000", "pk-1")
    models = load_settings(parse_args(["models", "import", "path/to/hf", "--name", "mine", "--force"]))
    assert (models.source, models.name, models.force) == ("path/to/hf", "mine", True)
    data = load_settings(parse_args(["data", "prepare", "out", "--location", "gcide=/a", "--location", "wordnet=/b"]))
    assert (data.out, data.location) == ("out", ["gcide=/a", "wordnet=/b"])
