"""The README's Training section is a test: its commands run top to bottom in a fresh folder, as a
newcomer would type them, at tiny scale. What changes is only the scale, through key=value
overrides: every `parley data prepare` reads a made-up chitchat file (the real sources are
installed by `make data-sources`, which is only dry-run here), training runs 2 steps of a depth-1
model, SFT starts from the model pretrained a moment before instead of SmolLM2, and the chat
answers one piped line with the respond stage alone. `torchrun` runs with 2 CPU processes (gloo).
"""

import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from train_job import tiny_chitchat

from parley import cli
from parley.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.steps=2", "train.batch_size=2", "train.seq_len=32", "train.eval_batches=1", "train.log_every=1",
        "train.dtype=float32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def training_commands() -> list[str]:
    """The lines of the fenced bash blocks in README.md's Training section, comments dropped."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Training\n(.*?)(?=^## )", readme, flags=re.S | re.M).group(1)
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.split(" #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def at_tiny_scale(argv: list[str], chitchat: Path) -> list[str]:
    """The same command, with the overrides that make it tiny and hermetic."""
    if argv[1:3] == ["data", "prepare"]:
        return [*argv, "sources=chitchat", f"location=chitchat={chitchat}", "val_fraction=0.2"]
    if argv[1:3] == ["train", "tokenizer"]:
        return [*argv, "vocab_size=400"]
    if argv[1:3] == ["train", "pretrain"]:
        return [*argv, *TINY, "model.depth=1"]
    if argv[1:3] == ["train", "sft"]:
        return [*argv, *TINY, "base=tiny"]
    if argv[1:2] == ["chat"]:
        return [*argv, "stages=respond", "max_tokens=4", "temperature=0"]
    raise AssertionError(f"the README's Training section has a command this test does not know: {shlex.join(argv)}")


def test_the_commands_are_the_recipe():
    commands = training_commands()
    assert commands[0] == "make data-sources" and commands[-1].startswith("parley chat")
    assert any(c.startswith("torchrun ") for c in commands)
    assert sum(c.startswith("parley train pretrain") for c in commands) >= 3


def test_the_readme_training_section_runs_top_to_bottom(tmp_path, monkeypatch, capsys, one_thread):
    home = tmp_path / "home"
    monkeypatch.setenv("PARLEY_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # the README names them from the repository root
    chitchat = tiny_chitchat(tmp_path / "chitchat.json")
    for line in training_commands():
        argv = shlex.split(line)
        if argv[0] == "make":  # installs packages: only check that the target exists
            dry = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
            assert dry.returncode == 0, f"{line}: {dry.stderr}"
            continue
        if argv[0] == "torchrun":  # torchrun OPTIONS -m parley ARGS: the module's arguments made tiny
            m = argv.index("-m")
            parley = at_tiny_scale(["parley", *argv[m + 2:]], chitchat)
            command = [sys.executable, "-m", "torch.distributed.run", *argv[1:m], "-m", "parley", *parley[1:]]
            run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                                 env={**ENV, "PARLEY_HOME": str(home)})
            assert run.returncode == 0, f"{line}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
            assert run.stdout.count("registered ") == 1  # the first process alone registers the model
            continue
        assert argv[0] == "parley", line
        if argv[1] == "chat":
            monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
        code = cli.main(at_tiny_scale(argv, chitchat)[1:])
        out = capsys.readouterr()
        assert code == 0, f"{line}:\n{out.out[-2000:]}\n{out.err[-2000:]}"
    names = {m.name for m in Registry().list()}
    assert {"tiny", "tiny-moe", "tiny-muon", "tiny-ddp", "smollm2-chitchat"} <= names
