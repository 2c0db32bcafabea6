"""Typed configs: TOML recipes, key=value overrides, one-line errors, and saved configs that
load back equal."""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import pytest

from parley.config import ConfigError, describe, load_config, parse_cli, save_config, setting, to_dict
from parley.train.loop import TrainConfig


@dataclass
class Model:
    depth: int = setting(2, "layers")
    width: float = setting(1.5, "width multiplier")


@dataclass
class Stage:
    out: str = setting(help="run folder")  # required
    data: list[str] = setting(factory=list, help="shard files")
    tokenizer: Path | None = setting(None, "tokenizer folder")
    kind: Literal["base", "chat"] = setting("base", "what to train")
    verbose: bool = setting(False, "print more")
    model: Model = field(default_factory=lambda: Model(depth=4))
    train: TrainConfig = field(default_factory=TrainConfig)


def recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_recipe_then_overrides(tmp_path):
    path = recipe(tmp_path, 'out = "runs/a"\ndata = ["a.bin"]\n[model]\nwidth = 2\n[train]\nlr = 0.001\nsteps = 10\n')
    cfg = load_config(Stage, path, ["train.steps=20", "model.depth=3", "data=x.bin,y.bin", "verbose=true",
                                    "tokenizer=tok", "kind=chat", "train.schedule=linear"])
    assert cfg.out == "runs/a" and cfg.data == ["x.bin", "y.bin"] and cfg.verbose is True
    assert cfg.tokenizer == Path("tok") and cfg.kind == "chat"
    assert cfg.model == Model(depth=3, width=2.0) and isinstance(cfg.model.width, float)  # TOML int -> float
    assert (cfg.train.lr, cfg.train.steps, cfg.train.schedule) == (0.001, 20, "linear")
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched keys keep their defaults
    assert load_config(Stage, None, ["out=o"]).model.depth == 4  # a section's default factory is its base
    assert load_config(Stage, None, ["out=o", "tokenizer=none"]).tokenizer is None
    assert load_config(Stage, None, ["out=o", 'data=["a,b", "c"]']).data == ["a,b", "c"]


@pytest.mark.parametrize("overrides, message", [
    (["out=o", "train.lrr=1"], r"unknown config key 'train.lrr' \(did you mean train.lr\?\)"),
    (["out=o", "modle.depth=1"], r"unknown config key 'modle.depth' \(did you mean model.depth\?\)"),
    (["out=o", "train.steps=ten"], r"train.steps: expected int, got 'ten'"),
    (["out=o", "train.steps=1.5"], r"train.steps: expected int, got '1.5'"),
    (["out=o", "verbose=maybe"], r"verbose: expected bool, got 'maybe'"),
    (["out=o", "kind=other"], r"kind: expected 'base' \| 'chat', got 'other'"),
    (["out=o", "train=3"], r"train is a section"),
    (["out"], r"override 'out' is not key=value"),
    ([], r"missing required value out"),
    (["out=o", "train.steps=0"], r"train: steps must be at least 1"),  # the dataclass's own check
])
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(Stage, None, overrides)
    assert "\n" not in str(err.value)


def test_bad_recipes(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found: .*nope.toml"):
        load_config(Stage, tmp_path / "nope.toml", [])
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Stage, recipe(tmp_path, "out = [unclosed\n"), [])
    with pytest.raises(ConfigError, match=r"train.lr: expected float, got 'fast'"):
        load_config(Stage, recipe(tmp_path, 'out = "o"\n[train]\nlr = "fast"\n'), [])
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step' \(did you mean train.steps\?\)"):
        load_config(Stage, recipe(tmp_path, 'out = "o"\n[train]\nstep = 3\n'), [])
    with pytest.raises(ConfigError, match=r"verbose: expected bool, got 1"):
        load_config(Stage, recipe(tmp_path, 'out = "o"\nverbose = 1\n'), [])


@pytest.mark.parametrize("suffix", ["toml", "json"])
def test_saved_config_loads_back_equal(tmp_path, suffix):
    cfg = load_config(Stage, None, ['out=runs/"quoted" é', "data=a,b", "tokenizer=tok", "train.lr=1e-5",
                                    "train.warmup_steps=0", "model.width=0.1"])
    path = tmp_path / f"config.{suffix}"
    save_config(cfg, path)
    assert load_config(Stage, path, []) == cfg
    assert to_dict(load_config(Stage, path, []))["tokenizer"] == "tok"


def test_describe_lists_every_key_with_help():
    text = describe(Stage)
    assert "  out: str (required)  run folder" in text
    assert "  train.lr: float = 0.003  peak learning rate (AdamW)" in text
    assert "  model.depth: int = 4  layers" in text  # the section's default factory, not the class default
    assert "  tokenizer: Path | none = None  tokenizer folder" in text
    assert all(f.metadata.get("help") for f in fields(TrainConfig))


def test_parse_cli(tmp_path, capsys):
    path = recipe(tmp_path, 'out = "o"\n')
    assert parse_cli(Stage, [str(path), "train.steps=5"]).train.steps == 5
    assert parse_cli(Stage, ["out=p"]).out == "p"
    with pytest.raises(SystemExit):
        parse_cli(Stage, ["--help"])
    assert "train.grad_accum" in capsys.readouterr().out


@dataclass
class Command:
    paths: list[Path] = setting(help="files to read", positional="PATH")
    user: str = setting("local", "whose")
    max_tokens: int = setting(8, "longest answer")
    force: bool = setting(False, "replace")
    stop: list[str] = setting(factory=list, help="stop strings")
    model: Model = field(default_factory=Model)


@pytest.mark.parametrize("argv", [
    ["a", "b", "user=ann", "max_tokens=20", "force=true", "model.depth=3"],
    ["--user=ann", "a", "--force", "b", "--max-tokens", "20", "--model.depth", "3"],
    ["a", "--user", "ann", "--max_tokens=20", "--force=yes", "max-tokens=20", "b", "--model.depth=3"],
])
def test_the_command_line_spellings_agree(argv):
    assert parse_cli(Command, argv) == Command([Path("a"), Path("b")], user="ann", max_tokens=20, force=True,
                                               model=Model(depth=3))


def test_command_line_lists_positionals_and_recipes(tmp_path, capsys):
    assert parse_cli(Command, ["a", "--stop", "x", "--stop", "y,z"]).stop == ["x", "y", "z"]  # repeated: added
    assert parse_cli(Command, ["a", "stop=q"]).stop == ["q"]
    assert parse_cli(Command, ["paths=a,b"]).paths == [Path("a"), Path("b")]  # a positional by its key
    path = recipe(tmp_path, 'user = "bob"\npaths = ["r"]\n')
    assert parse_cli(Command, [str(path), "--max-tokens", "-1"]) == Command([Path("r")], user="bob", max_tokens=-1)
    with pytest.raises(SystemExit):
        parse_cli(Command, ["--help"], prog="parley thing")
    out = capsys.readouterr().out
    assert out.startswith("usage: parley thing [RECIPE.toml] PATH... ")
    assert "  paths (PATH...): list[Path] (required)  files to read" in out and "  model.depth: int = 2  layers" in out


@pytest.mark.parametrize("argv, message", [
    (["a", "--usr", "bob"], r"^unknown config key 'usr' \(did you mean user\?\)"),
    (["a", "--max-tokens", "many"], r"^max_tokens: expected int, got 'many'$"),
    (["a", "--user"], r"^--user needs a value: --user VALUE or user=VALUE$"),
    (["a", "--model.width"], r"^--model.width needs a value"),
    (["a", "--model", "x"], r"^model is a section: set model.KEY$"),
    (["a", "force=maybe"], r"^force: expected bool, got 'maybe'$"),
    ([], r"^missing required value paths"),
])
def test_command_line_mistakes_are_one_line(argv, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_cli(Command, argv)
    assert "\n" not in str(err.value)


def test_a_stray_argument_is_named():
    with pytest.raises(ConfigError, match=r"unexpected argument 'extra': parley x takes settings as key=value"):
        parse_cli(Stage, ["out=o", "extra"], prog="parley x")
