"""Typed dataclass configs that double as the CLI: defaults and help written once, TOML
recipes on top, `key.sub=value` overrides on top of that.

    @dataclass
    class PretrainConfig:
        out: str = setting(help="run folder")                      # required: no default
        train: TrainConfig = field(default_factory=TrainConfig)     # a [train] section
    cfg = load_config(PretrainConfig, "recipes/pretrain.toml", ["train.lr=1e-3", "out=runs/a"])
    save_config(cfg, "runs/a/config.toml")                          # what the run really used
    print(describe(PretrainConfig))                                 # every key, type, default, help

    cfg = parse_cli(IngestConfig, ["notes/", "--user", "ann", "collection=home"], prog="parley ingest")

On a command line (parse_cli) a key is `key=value`, `--key=value` or `--key value`, a bool
also a bare `--flag`, with dashes read as underscores (`--max-tokens 20` is `max_tokens=20`);
a field made with `setting(..., positional="PATH")` may be given without its key.

Values are checked against the field's annotation: int, float, bool, str, Path, Literal[...],
list[X], X | None and nested dataclasses. Every mistake is one ConfigError line naming the key.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from parley.files import NotRegularFile, read_regular

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or override that does not fit the config: one line, naming the key."""


def setting(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, positional: str = ""):
    """A dataclass field with help text: `lr: float = setting(3e-4, "peak learning rate")`.
    Without a default (or factory) the value is required. `positional="PATH"` lets the
    command line give it without its key (a list field takes every remaining argument)."""
    return field(default=default, default_factory=factory, metadata={"help": help, "positional": positional})


# ---------------------------------------------------------------- reading values

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolves the strings that `from __future__ import annotations` leaves


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0]) if args else 'any'}]"
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _parse_text(text: str, tp):
    """A command-line string as a TOML-ish value of type `tp` (then checked by _coerce)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        rest = [a for a in args if a is not type(None)]
        return _parse_text(text, rest[0]) if len(rest) == 1 else text
    if origin is Literal:  # choices may be numbers: match their text
        return next((a for a in args if str(a) == text), text)
    if origin is list:
        if text.startswith("["):  # full TOML array syntax: [1, 2] or ["a,b", "c"]
            return tomllib.loads(f"v = {text}")["v"]
        return [_parse_text(t.strip(), args[0] if args else str) for t in text.split(",") if t.strip()]
    if tp is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        return text
    for number in (int, float):
        if tp is number:
            try:
                return number(text)
            except ValueError:
                return text
    return text


def _coerce(value, tp, key: str):
    """Check `value` against annotation `tp`; return it converted (int -> float, str -> Path)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value not in args:
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):  # nan and inf pass range checks written as comparisons: refused here, once
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise bad
        return Path(value)
    if tp is Any:
        return value
    if not isinstance(value, tp):
        raise bad
    return value


def _keys(cls, prefix: str = "") -> list[str]:
    """Every settable dotted key of a (nested) config class."""
    out = []
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        out += _keys(tp, f"{prefix}{f.name}.") if is_dataclass(tp) else [prefix + f.name]
    return out


def _unknown(key: str, cls) -> ConfigError:
    close = difflib.get_close_matches(key, _keys(cls), n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}; --help lists every key")


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls, values: dict, root, prefix: str = ""):
    """An instance of `cls` from a nested dict of values; missing keys take their defaults."""
    hints, kwargs = _hints(cls), {}
    names = {f.name for f in fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown(prefix + key, root)
    for f in fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if is_dataclass(tp):
            section = values.get(f.name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{key} is a section: set {key}.KEY, or [{key}] in the recipe")
            # a section's own default (a factory with other values than its class) is the base
            base = f.default_factory() if f.default_factory is not MISSING else f.default
            base = to_dict(base) if is_dataclass(base) else {}
            kwargs[f.name] = _build(tp, _merge(base, section), root, key + ".")
        elif f.name in values:
            kwargs[f.name] = _coerce(values[f.name], tp, key)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"missing required value {key} (set it in the recipe or as {key}=...)")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the dataclass's own __post_init__ checks
        raise ConfigError(f"{prefix.rstrip('.')}: {e}" if prefix else str(e)) from e


def _read_recipe(path) -> dict:
    path = Path(path)
    try:
        text = read_regular(path).decode("utf-8")  # a FIFO would block the read, a device never end
        if path.suffix == ".json":
            return json.loads(text)
        return tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"recipe not found: {path}") from None
    except NotRegularFile:
        raise ConfigError(f"recipe {path} is not a regular file (a folder, pipe or device): give a .toml or .json file") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})") from e


def _override(cls, values: dict, item: str, seen: set[str]) -> None:
    """Set one `key.sub=value` override in the nested `values`, parsed by the field's type; a
    list key given again (`--stop a --stop b`) adds to the list instead of replacing it."""
    key, eq, text = item.partition("=")
    key = key.strip().removeprefix("--")
    if not eq or not key:
        raise ConfigError(f"override {item!r} is not key=value")
    owner, node, parts = cls, values, key.split(".")
    for i, part in enumerate(parts):  # walk down the sections to the field being set
        tp = _hints(owner).get(part) if is_dataclass(owner) else None
        if tp is None:
            raise _unknown(key, cls)
        if i < len(parts) - 1:
            if not is_dataclass(tp):
                raise _unknown(key, cls)
            owner, node = tp, node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[:i + 1])} is a section, but the recipe sets it to a value")
        elif is_dataclass(tp):
            raise ConfigError(f"{key} is a section: set {key}.KEY")
        else:
            try:
                value = _parse_text(text.strip(), tp)
            except (tomllib.TOMLDecodeError, RecursionError) as e:  # a list given in TOML's [...] syntax
                raise ConfigError(f"{key}: {text.strip()[:40]!r} is not a TOML list ({e})") from None
            if key in seen and isinstance(value, list) and isinstance(node.get(part), list):
                value = node[part] + value
            node[part], _ = value, seen.add(key)


def load_config(cls: type[T], recipe_path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """`cls` filled from its defaults, then the recipe (TOML, or JSON by suffix), then the
    `key.sub=value` overrides, each parsed by the type of the field it sets."""
    values, seen = _read_recipe(recipe_path) if recipe_path else {}, set()
    for item in overrides:
        _override(cls, values, item, seen)
    return _build(cls, values, cls)


# ---------------------------------------------------------------- writing and describing

def to_dict(cfg) -> dict:
    """The config as plain JSON/TOML values (nested dicts; Paths as strings)."""
    def plain(v):
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v) if isinstance(v, Path) else v
    return plain(cfg)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # floats: Python's repr is valid TOML (1e-05, inf, nan)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} to TOML")


def to_toml(cfg) -> str:
    """TOML text that load_config reads back to an equal config. TOML has no null, so a None
    is left out: it reads back as the field's default, which must then be None too."""
    lines: list[str] = []

    def section(obj, name: str):
        subs = []
        if name:
            lines.append(f"\n[{name}]")
        for f in fields(obj):
            v = getattr(obj, f.name)
            if is_dataclass(v):
                subs.append((v, f"{name}.{f.name}" if name else f.name))
            elif v is None:
                if f.default is not None:
                    raise ConfigError(f"{name + '.' if name else ''}{f.name} is None but defaults to "
                                      f"{f.default!r}: TOML cannot say so, save as .json")
            else:
                lines.append(f"{f.name} = {_toml_value(to_dict(v) if isinstance(v, Path) else v)}")
        for v, sub in subs:
            section(v, sub)

    section(cfg, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def save_config(cfg, path) -> None:
    """Write the config as TOML, or JSON when the path ends in .json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_dict(cfg), indent=2) + "\n" if path.suffix == ".json" else to_toml(cfg)
    path.write_text(text)


def describe(cls, prefix: str = "", base=None) -> str:
    """One line per key: `name: type = default  help`, nested sections dotted. Defaults are
    what load_config starts from: a section's default factory overrides its class's."""
    rows = []
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        if base is not None:
            value = getattr(base, f.name)
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            value = f.default
        if is_dataclass(tp):
            rows.append(describe(tp, f"{prefix}{f.name}.", value if is_dataclass(value) else None))
            continue
        default = " (required)" if value is MISSING else f" = {to_dict(value)!r}"
        slot = f" ({f.metadata['positional']}{'...' if typing.get_origin(tp) is list else ''})" \
            if f.metadata.get("positional") else ""
        rows.append(f"  {prefix}{f.name}{slot}: {_type_name(tp)}{default}  {f.metadata.get('help', '')}".rstrip())
    return "\n".join(rows)


def _positionals(cls) -> list:
    return [f for f in fields(cls) if f.metadata.get("positional")]


def usage(cls, prog: str) -> str:
    """What `PROG --help` prints: the command's shape, then every key once."""
    slots = " ".join(f.metadata["positional"] + ("..." if typing.get_origin(_hints(cls)[f.name]) is list else "")
                     for f in _positionals(cls))
    return (f"usage: {prog} [RECIPE.toml] {slots + ' ' if slots else ''}[key=value | --key value ...]\n\n"
            "keys (key=value, --key=value or --key value; - or _ alike; a bare --flag sets a bool to true):\n"
            f"{describe(cls)}")


KEY = re.compile(r"[A-Za-z_][\w.-]*")


def parse_cli(cls: type[T], argv: list[str], prog: str = "parley") -> T:
    """A command line as `cls`: `[RECIPE.toml] [POSITIONAL ...] [key=value | --key=value |
    --key value | --flag ...]`, dashes in keys read as underscores (`--max-tokens 20` is
    `max_tokens=20`); `--help` prints every key and exits. Raises ConfigError on any mistake."""
    if any(a in ("-h", "--help") for a in argv):
        print(usage(cls, prog))
        raise SystemExit(0)
    args = list(argv)
    first = args[0] if args else ""
    recipe = args.pop(0) if first.endswith((".toml", ".json")) and "=" not in first and first[:1] != "-" else None
    overrides, loose = [], []
    while args:
        arg = args.pop(0)
        key, eq, text = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and KEY.fullmatch(key):
            key = key.replace("-", "_")
            if not eq:
                tp = _field_type(cls, key)
                if tp is bool:
                    text = "true"
                elif args:
                    text = args.pop(0)
                else:
                    raise ConfigError(f"{arg} needs a value: {arg} VALUE or {key}=VALUE")
            overrides.append(f"{key}={text}")
        elif eq and KEY.fullmatch(key):
            overrides.append(f"{key.replace('-', '_')}={text}")
        else:
            loose.append(arg)
    values, seen = _read_recipe(recipe) if recipe else {}, set()
    for item in overrides:
        _override(cls, values, item, seen)
    for f in _positionals(cls):
        if not loose:
            break
        tp = _hints(cls)[f.name]
        if typing.get_origin(tp) is list:
            values[f.name] = [_parse_text(a, typing.get_args(tp)[0]) for a in loose]
            loose = []
        else:
            values[f.name] = _parse_text(loose.pop(0), tp)
    if loose:
        raise ConfigError(f"unexpected argument {loose[0]!r}: {prog} takes settings as key=value or --key value "
                          f"({prog} --help lists them)")
    return _build(cls, values, cls)


def _field_type(cls, key: str):
    """The annotation of dotted `key`, or the unknown-key error."""
    owner = cls
    for part in key.split("."):
        tp = _hints(owner).get(part) if is_dataclass(owner) else None
        if tp is None:
            raise _unknown(key, cls)
        owner = tp
    return owner
