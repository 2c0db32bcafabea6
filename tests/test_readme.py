"""The README is the front door: its first two commands are `make chat` and `make test`,
those targets exist, and every `parley ...` command it shows parses."""

import re
import shlex
import subprocess
from pathlib import Path

from parley.cli import load_settings, parse_args

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_lines() -> list[str]:
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README, flags=re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_two_commands():
    assert code_lines()[:2] == ["make chat", "make test"]
    for target in ("chat", "test"):
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_parley_command_in_the_readme_parses():
    commands = [line for line in code_lines() if line.startswith("parley ") or "| parley " in line]
    assert len(commands) >= 6
    for line in commands:
        args = shlex.split(line.split("| ")[-1])[1:]
        load_settings(parse_args(args))  # ConfigError (fails the test) on an unknown command, key or value
