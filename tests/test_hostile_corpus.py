"""`parley data prepare OUT location=NAME=PATH` pointed at files nobody should trust: pipes and
devices, damaged or bomb-like .dz and `compress` data, JSON and YAML of the wrong shape, lines
crafted to make the cleaning regexes slow, an OUT that is a source. Each source gets a clear
reason to be skipped (naming the file) or the command a one-line error, in seconds, never a hang,
a traceback or a source's files overwritten."""

import gzip
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parley import cli
from parley.train import corpus
from parley.model.tokenizer import Tokenizer
from parley.train.corpus import SOURCES, prepare
from test_data import b64, lzw_codes

CAT = b"CAT, n. A soft, indestructible automaton provided by nature to be kicked.\n"


@pytest.fixture(autouse=True)
def deadline():
    """A reader that waits on a pipe fails the test instead of hanging the suite."""
    def expire(*_):
        raise TimeoutError("still reading after 10 s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def dictd(folder: Path, data: bytes, index: str | None = None, name: str = "devil", raw: bool = False) -> Path:
    """`name`.dict.dz (gzip'd `data`, or `data` as it is) and an index of one entry spanning it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.index").write_text(f"cat\tA\t{b64(len(data))}\n" if index is None else index)
    path = folder / f"{name}.dict.dz"
    path.write_bytes(data if raw else gzip.compress(data))
    return path


def special(path: Path, kind: str) -> Path:
    """A pipe (reading it waits for a writer forever) or a link to /dev/zero (reading never ends)."""
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
    return path


def skipped(tmp_path: Path, capsys, name: str, location: Path, *args: str) -> str:
    """`parley data prepare` of one source at `location`: exit 2, the source skipped; its reason."""
    out = tmp_path / "out"
    assert cli.main(["data", "prepare", str(out), f"sources={name}", f"location={name}={location}", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "every source is missing" in err, err
    reason = json.loads((out / "manifest.json").read_text())["sources"][name]["skipped"]
    assert f"skipping source {name}: {reason}\n" in err
    assert not list(out.rglob(".*")), "a temporary file was left behind"
    return reason


# ---------------------------------------------------------------- files that are no files

# (source, where the pipe or device goes inside the location, the location) for each reader
SPECIALS = {
    "devil": ("devil.dict.dz", "devil.dict.dz"),
    "bible-kjv": ("bible.data", "bible.data"),
    "chitchat": ("dataset.json", "dataset.json"),
    "python-docs": ("docs/a.rst.txt", "docs"),
    "sotu": ("sotu/1790.json", "sotu"),
    "chatterbot": ("bot/food.yml", "bot"),
}


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("name", SPECIALS)
def test_a_pipe_or_device_in_a_location_is_refused(name, kind, tmp_path, capsys):
    """A pipe blocked the reader forever; a link to /dev/zero was read until a MemoryError traceback."""
    inside, location = SPECIALS[name]
    (tmp_path / inside).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "devil.index").write_text("cat\tA\tB\n")
    special(tmp_path / inside, kind)
    reason = skipped(tmp_path, capsys, name, tmp_path / location)
    # a link to /dev/zero inside a source's folder is refused first as a link out of the folder
    message = "is not a regular file" if kind == "fifo" or inside == location else "links out of .* \\(to /dev/zero\\)"
    assert re.search(f"{re.escape(str(tmp_path / inside))} {message}", reason), reason


@pytest.mark.parametrize("name, inside, location", [
    ("devil", "devil.dict.dz", "devil.dict.dz"), ("bible-kjv", "bible.data", "bible.data"),
    ("fortunes", "fortunes/wisdom", "fortunes"), ("wordnet", "wordnet/data.noun", "wordnet"),
])
def test_a_file_over_the_size_limit_is_refused_before_it_is_read(name, inside, location, tmp_path, capsys,
                                                                  monkeypatch):
    """Every file was read whole: a 3 GiB fortune file was a MemoryError traceback."""
    monkeypatch.setattr(corpus, "MAX_BYTES", 1000)
    (tmp_path / inside).parent.mkdir(parents=True, exist_ok=True)
    dictd(tmp_path, b"x")
    with open(tmp_path / inside, "wb") as f:
        f.truncate(5000)
    reason = skipped(tmp_path, capsys, name, tmp_path / location)
    assert f"{tmp_path / inside}: 5,000 bytes, over the limit of 1,000" in reason, reason


def test_a_symlink_loop_is_not_called_missing(tmp_path, capsys):
    """It said 'not found: install apt:bible-kjv-text', sending the user to install what is there."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    reason = skipped(tmp_path, capsys, "bible-kjv", tmp_path / "a")
    assert "symbolic link" in reason and "install" not in reason, reason


# ---------------------------------------------------------------- damaged and bomb-like data

@pytest.mark.parametrize("damage, message", [
    (lambda dz: dz[:30], "truncated"),  # was an EOFError traceback
    (lambda dz: dz[:20] + b"\xff" * 20 + dz[40:], "damaged or not gzip data"),  # was a zlib.error traceback
    (lambda dz: b"Hd" + dz[2:], "damaged or not gzip data"),  # said only "Not a gzipped file (b'Hd')"
])
def test_a_damaged_dz_names_the_file(damage, message, tmp_path, capsys):
    path = dictd(tmp_path, CAT * 50)
    path.write_bytes(damage(path.read_bytes()))
    reason = skipped(tmp_path, capsys, "devil", path)
    assert str(path) in reason and message in reason, reason


def test_a_gzip_bomb_is_refused_at_the_limit(tmp_path, capsys, monkeypatch):
    """gzip.decompress inflated it whole: 6 GiB of zeros (6 MB on disk) was a MemoryError traceback."""
    monkeypatch.setattr(corpus, "MAX_BYTES", 100_000)
    path = dictd(tmp_path, b"\0" * 10_000_000)
    reason = skipped(tmp_path, capsys, "devil", path)
    assert f"{path} holds over 100,000 bytes" in reason, reason


@pytest.mark.parametrize("index, message", [
    ("cat\t!!\t#\n", r"devil.index:1: .*base64"),  # a KeyError: 'parley: error: !', the whole run ended
    ("c\xffat\tA\tB\n", r"devil.index is not UTF-8"),  # the message named no file
])
def test_a_damaged_dictd_index_names_file_and_line(index, message, tmp_path, capsys):
    path = dictd(tmp_path, CAT, index="")
    (tmp_path / "devil.index").write_bytes(index.encode("latin-1"))
    assert re.search(message, skipped(tmp_path, capsys, "devil", path))


def bible(path: Path, count: int, offsets: list[int], windows: bytes) -> Path:
    path.write_bytes(b"EC02" + b"\0" * 80 + struct.pack(">II", 700, count)
                     + struct.pack(f">{len(offsets)}I", *offsets) + b"\x1f\x9d\x90" + windows)
    return path


def lzw_bomb(codes: int) -> bytes:
    """LZW codes each naming the entry being defined: entry k is k+1 bytes, the output grows as codes**2."""
    return lzw_codes([97] + [257 + i for i in range(codes)])


def test_bible_data_that_lies(tmp_path, capsys, monkeypatch):
    # 2**32 - 1 windows in a 116-byte file: a struct.error traceback
    reason = skipped(tmp_path, capsys, "bible-kjv", bible(tmp_path / "count", 0xFFFFFFFF, [0, 0], b""))
    assert "count" in reason and "4,294,967,295 windows" in reason, reason
    # a window that decodes to codes**2 bytes (120 KB of codes, 2 GB of text): a MemoryError traceback
    monkeypatch.setattr(corpus, "MAX_BYTES", 1_000_000)
    codes = lzw_bomb(3000)
    at = 92 + 8 + 3
    reason = skipped(tmp_path, capsys, "bible-kjv", bible(tmp_path / "bomb", 1, [at, at + len(codes)], codes))
    assert "bomb" in reason and "over 1,000,000 bytes" in reason, reason


# ---------------------------------------------------------------- JSON and YAML of the wrong shape

@pytest.mark.parametrize("data, message", [
    ({"c0": {"messages": [[{"text": "Hello there you"}], [{"text": "Hi to you too"}]]},  # kept before the error
      "c1": {"messages": [5]}}, "conversation c1: turn 1 is not a list"),  # TypeError traceback
])
def test_chitchat_of_the_wrong_shape(data, message, tmp_path, capsys):
    (tmp_path / "d.json").write_text(json.dumps(data))
    reason = skipped(tmp_path, capsys, "chitchat", tmp_path / "d.json")
    assert f"{tmp_path / 'd.json'}: {message}" in reason, reason
    assert (tmp_path / "out" / "dialogs-train.jsonl").read_text() == ""  # no half of a skipped source


def test_chatterbot_of_the_wrong_shape(tmp_path, capsys, monkeypatch):
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "a.yml").write_text("- a\n- b\n")  # an AttributeError traceback
    assert f"{tmp_path / 'bot' / 'a.yml'}: expected a mapping with 'conversations'" in \
        skipped(tmp_path, capsys, "chatterbot", tmp_path / "bot")
    (tmp_path / "bot" / "a.yml").write_bytes(b"conversations:\n- - caf\xe9\n")  # the message named no file
    assert f"{tmp_path / 'bot' / 'a.yml'} is not UTF-8" in skipped(tmp_path, capsys, "chatterbot", tmp_path / "bot")
    # one string, aliased ten thousand times: 40 KB of YAML became 1 GB of conversation
    monkeypatch.setattr(corpus, "MAX_BYTES", 1_000_000)
    turns = ", ".join(["*s"] * 10_000)
    (tmp_path / "bot" / "a.yml").write_text(f"s: &s {'x' * 100_000}\nconversations:\n- [{turns}]\n")
    reason = skipped(tmp_path, capsys, "chatterbot", tmp_path / "bot")
    assert f"{tmp_path / 'bot' / 'a.yml'} expands to over 1,000,000 characters" in reason, reason


@pytest.mark.parametrize("name, files", [
    ("devil", {"devil.dict.dz": gzip.compress(b""), "devil.index": b""}),
    ("wordnet", {"data.noun": b""}),
    ("fortunes", {"wisdom": b""}),
    ("chatterbot", {"a.yml": b"conversations: 5\n"}),
])
def test_a_source_that_yields_nothing_is_skipped_not_kept_empty(name, files, tmp_path, capsys):
    """Files of the right names but no documents made an empty corpus and exit status 0."""
    (tmp_path / "src").mkdir()
    for file, data in files.items():
        (tmp_path / "src" / file).write_bytes(data)
    location = tmp_path / "src" / "devil.dict.dz" if name == "devil" else tmp_path / "src"
    reason = skipped(tmp_path, capsys, name, location)
    assert f"no documents in {location}" in reason, reason


# ---------------------------------------------------------------- lines crafted to be slow

@pytest.mark.parametrize("name, entry", [
    ("python-docs", "x:a" + ":a" * 100_000),  # _ROLE tried every colon to the line's end: 30 s at 80 KB
    ("python-docs", "See `a" + " " * 100_000 + "x"),  # `title <url>`_: every space tried against the rest
    ("gcide", "A cat.\n" + "\n" * 100_000 + "x"),  # a tag line's \s* ran over every blank line to the end
    ("gcide", "A cat " + "[" * 100_000),  # a source tag's start at every '['
    ("gcide", "A cat " + "\\x\\(" * 25_000),  # a pronunciation's '(' looked to the line's end each time
    ("foldoc", "A cat.\n" + "\n" * 100_000 + "x"),  # the (1994-11-08) date line, as the tag line
    ("devil", ("a" * 60 + "\n") * 100_000),  # unwrap copied the paragraph for each line joined
])
def test_cleaning_is_linear_on_crafted_entries(name, entry, tmp_path):
    started = time.time()
    if name == "python-docs":
        corpus.rst_text(entry)
    else:
        SOURCES[name].clean_text(entry)
    assert time.time() - started < 2


def test_directives_nested_too_deep_are_refused(tmp_path, capsys):
    """A RecursionError traceback."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.rst.txt").write_text(
        "".join("   " * i + ".. note::\n\n" for i in range(1200)) + "   " * 1200 + "Words here.\n")
    reason = skipped(tmp_path, capsys, "python-docs", tmp_path / "docs")
    assert f"{tmp_path / 'docs' / 'a.rst.txt'}: directives nested over" in reason, reason


# ---------------------------------------------------------------- the command line and OUT

@pytest.mark.parametrize("args, message", [
    (["location==/tmp"], r"location=NAME=PATH needs a NAME and a PATH, not '=/tmp'"),  # 'unknown source(s) '
    (["sources=devil", "location=devil="], r"needs a NAME and a PATH, not 'devil='"),  # used the default
    (["location=devil=/a", "location=devil=/b"], r"location=devil= is given twice"),  # the last silently won
    (["location=nosuch=/tmp"], r"unknown source\(s\) nosuch; choose from gcide, wordnet"),
])
def test_location_arguments_are_checked(args, message, tmp_path, capsys):
    assert cli.main(["data", "prepare", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"parley: error: .*{message}.*\n", err), err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_says_so(tmp_path, capsys):
    (tmp_path / "plain").write_text("mine")
    assert cli.main(["data", "prepare", str(tmp_path / "plain"), "sources=devil",
                     f"location=devil={dictd(tmp_path, CAT)}"]) == 2
    assert f"{tmp_path / 'plain'} is a file: OUT must be a folder" in capsys.readouterr().err
    assert (tmp_path / "plain").read_text() == "mine"


@pytest.mark.parametrize("name, location, out", [
    ("fortunes", "src", "src"),  # a second run read manifest.json and dialogs-*.jsonl as fortunes
    ("sotu", "src", "src/corpus"),
    ("chitchat", "out/dialogs-train.jsonl", "out"),  # the source was read, then replaced by the dialogs
    ("chitchat", "out/text/chitchat.jsonl", "out"),
])
def test_out_that_overlaps_a_source_is_refused(name, location, out, tmp_path, capsys):
    (tmp_path / location).parent.mkdir(parents=True, exist_ok=True)
    if name == "chitchat":
        (tmp_path / location).write_text(json.dumps({"c": {"messages": [[{"text": "hi there you"}],
                                                                        [{"text": "hello to you too"}]]}}))
    else:
        (tmp_path / location).mkdir(exist_ok=True)
        (tmp_path / location / "w").write_text("A clash of doctrine is not a disaster.\n%\n")
    before = sorted((p, p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert cli.main(["data", "prepare", str(tmp_path / out), f"sources={name}",
                     f"location={name}={tmp_path / location}"]) == 2
    err = capsys.readouterr().err
    assert re.search(f"OUT {re.escape(str(tmp_path / out))} and {name}'s location .* overlap", err), err
    assert sorted((p, p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*")) == before


def test_a_hostile_source_leaves_the_others_whole(tmp_path, capsys):
    """One bad location is skipped with its reason; the good source is still written."""
    (tmp_path / "fifo.json").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "fifo.json")
    manifest = prepare(tmp_path / "out", sources=["devil", "chitchat"],
                       locations={"devil": dictd(tmp_path, CAT), "chitchat": tmp_path / "fifo.json"})
    assert manifest["sources"]["devil"]["documents"] == 1
    assert "not a regular file" in manifest["sources"]["chitchat"]["skipped"]


# ---------------------------------------------------------------- folders too big, too deep, or leading out

FOLDER_SOURCES = {"fortunes": "w{}", "sotu": "{}.json", "chatterbot": "{}.yml", "python-docs": "{}.rst.txt"}


@pytest.mark.parametrize("name", FOLDER_SOURCES)
def test_a_folder_of_too_many_files_is_refused_before_it_is_read(name, tmp_path, capsys, monkeypatch):
    """Every file of a folder was read: 200,000 tiny files (a location= at a home folder) took minutes."""
    monkeypatch.setattr(corpus, "MAX_FILES", 100, raising=False)
    (tmp_path / "src").mkdir()
    for i in range(101):
        (tmp_path / "src" / FOLDER_SOURCES[name].format(i)).write_text("")
    reason = skipped(tmp_path, capsys, name, tmp_path / "src")
    assert f"{tmp_path / 'src'} holds over 100 files and folders" in reason, reason
    assert f"point location={name}= at the source's own folder" in reason, reason


def test_a_folder_nested_too_deep_is_refused(tmp_path, capsys):
    """python-docs walked every subfolder: 1,500 of them nested was a RecursionError traceback."""
    folders = [tmp_path / "docs"]
    for _ in range(1500):  # one at a time: mkdir(parents=True) and rmtree recurse too
        folders[-1].mkdir()
        folders.append(folders[-1] / "a")
    (folders[-2] / "x.rst.txt").write_text("Words of a document nobody reaches.\n")
    try:
        reason = skipped(tmp_path, capsys, "python-docs", tmp_path / "docs")
    finally:
        (folders[-2] / "x.rst.txt").unlink()
        for folder in reversed(folders[:-1]):
            folder.rmdir()
    assert re.search(f"{re.escape(str(tmp_path / 'docs'))} has folders nested over {corpus.MAX_FOLDER_DEPTH} "
                     "deep: point location=python-docs= at the source's own folder", reason), reason


@pytest.mark.parametrize("name", ["sotu", "chatterbot", "python-docs"])  # fortunes reads no links at all
def test_a_file_that_links_out_of_the_folder_is_refused(name, tmp_path, capsys):
    """A link in the folder was read wherever it led: a downloaded folder's `a.rst.txt -> ~/.ssh/id_rsa`
    put the key into the training text. Links inside the folder, and a link back up (a loop), are fine."""
    src, line = tmp_path / "src", "A clash of doctrine is not a disaster, it is an opportunity."
    (src / "sub").mkdir(parents=True)
    documents = {"sotu": json.dumps({"year": 1, "name": "x", "text": line}),
                 "chatterbot": f"conversations:\n- - {line}\n  - {line}\n", "python-docs": f"{line}\n"}
    (src / "sub" / "real").write_text(documents[name])
    (src / FOLDER_SOURCES[name].format("a")).symlink_to(src / "sub" / "real")
    (src / "sub" / "up").symlink_to(src)
    assert cli.main(["data", "prepare", str(tmp_path / "ok"), f"sources={name}", f"location={name}={src}"]) == 0
    (tmp_path / "secret").write_text(documents[name].replace("clash", "secret"))
    link = src / FOLDER_SOURCES[name].format("b")
    link.symlink_to(tmp_path / "secret")
    reason = skipped(tmp_path, capsys, name, src)
    assert f"{link} links out of {src} (to {tmp_path / 'secret'})" in reason, reason


def test_a_wordnet_file_that_links_out_of_the_folder_is_refused(tmp_path, capsys):
    """WordNet's data.* files have fixed names and were read wherever a link led; one inside the folder is fine."""
    synset = "00001740 03 n 01 {} 0 000 | that which is perceived or known\n"
    src = tmp_path / "wordnet"
    (src / "dict").mkdir(parents=True)
    (src / "dict" / "data.noun").write_text(synset.format("entity"))
    (src / "data.noun").symlink_to(src / "dict" / "data.noun")
    assert cli.main(["data", "prepare", str(tmp_path / "ok"), "sources=wordnet", f"location=wordnet={src}"]) == 0
    (tmp_path / "secret").write_text(synset.format("secret"))
    (src / "data.verb").symlink_to(tmp_path / "secret")
    reason = skipped(tmp_path, capsys, "wordnet", src)
    assert f"{src / 'data.verb'} links out of {src} (to {tmp_path / 'secret'})" in reason, reason


def test_a_dictd_index_that_links_out_of_the_folder_is_refused(tmp_path, capsys):
    """The index beside a .dz was read wherever a link led, and a line that did not parse was quoted in the error."""
    src = tmp_path / "src"
    src.mkdir()
    path = dictd(src, CAT)
    assert cli.main(["data", "prepare", str(tmp_path / "ok"), "sources=devil", f"location=devil={path}"]) == 0
    (tmp_path / "secret").write_text("password\t!hunter2\tsecret\n")
    (src / "devil.index").unlink()
    (src / "devil.index").symlink_to(tmp_path / "secret")
    reason = skipped(tmp_path, capsys, "devil", path)
    assert f"{src / 'devil.index'} links out of {src} (to {tmp_path / 'secret'})" in reason, reason
    assert "hunter2" not in reason


# ---------------------------------------------------------------- a run that was killed

def test_a_killed_runs_temporary_files_are_removed_and_nothing_else(tmp_path, capsys):
    """SIGKILL mid-run left `.gcide.jsonl.6qlebrks` (5 MB, a shard's would be 256 MB) in OUT/text for good."""
    out = tmp_path / "out"
    (out / "text").mkdir(parents=True)
    ours = [out / "text" / ".gcide.jsonl.6qlebrks.tmp", out / ".manifest.json.a_b1c2d3.tmp",
            out / ".dialogs-val.jsonl.zzzzzzzz.tmp", out / ".train-007.bin.k2j3h4g5.tmp"]
    theirs = [out / "text" / ".mine.jsonl.6qlebrks.tmp", out / ".manifest.json.bak", out / "notes.tmp",
              out / ".manifest.json.6qlebrks", out / ".manifest.json.toolong12345.tmp", out / "text" / "gcide.tmp"]
    for file in ours + theirs:
        file.write_text("x")
    assert cli.main(["data", "prepare", str(out), "sources=devil", f"location=devil={dictd(tmp_path, CAT)}"]) == 0
    assert [f.name for f in ours if f.exists()] == []
    assert [f.name for f in theirs if not f.exists()] == []
    assert sorted(f.name for f in out.rglob(".*")) == sorted(f.name for f in theirs if f.name.startswith("."))


def test_a_second_prepare_into_the_same_out_stops_at_once(tmp_path, capsys):
    """Two runs into one OUT overwrote each other's outputs, and the second removed the first one's
    temporary files. Another process holds OUT as a running prepare does (corpus._writing); this one
    stops with one line and touches nothing; once the other is gone, it runs."""
    out, source = tmp_path / "out", dictd(tmp_path, CAT)
    (out / "text").mkdir(parents=True)
    leftover = out / ".manifest.json.abcd1234.tmp"  # the other run's file in progress, written once it holds OUT
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from parley.train import corpus; from pathlib "
                               "import Path\nwith corpus._writing(Path(sys.argv[1])):\n print('held', flush=True); "
                               "sys.stdin.read()", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        assert holder.stdout.readline() == "held\n"
        leftover.write_text("x")
        args = ["data", "prepare", str(out), "sources=devil", f"location=devil={source}"]
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"another `parley data prepare` is writing {out}" in err, err
        assert leftover.exists() and not (out / "manifest.json").exists()
    finally:
        holder.communicate("")
    assert cli.main(args) == 0 and (out / "manifest.json").is_file() and not leftover.exists()
    # prepare's own tokenize runs inside its lock (no error from itself), and a lone tokenize takes it again
    (tmp_path / "words.txt").write_text(CAT.decode() * 4)
    tokenizer = Tokenizer.train([tmp_path / "words.txt"], vocab_size=300)
    tokenizer.save(tmp_path / "tok")
    assert cli.main([*args, f"--tokenizer={tmp_path / 'tok'}"]) == 0
    assert sum(corpus.tokenize(out, tokenizer)["tokens"].values()) == 28


# ---------------------------------------------------------------- bytes that decode but are no text

@pytest.mark.parametrize("name, data", [
    ("fortunes", bytes(range(256)) * 40),  # Latin-1 takes any byte: C1 controls, NULs
    ("fortunes", random.Random(0).randbytes(1 << 14)),  # a binary file among the fortunes
    ("devil", bytes(range(128, 256)) * 40),  # invalid UTF-8: replacement characters
    ("devil", ("\x85\x9c word " * 400).encode()),  # UTF-8 of C1 control characters
])
def test_bytes_that_decode_but_are_no_text_are_dropped_and_counted(name, data, tmp_path, capsys):
    """They became training documents: 16 KB of random bytes, decoded as Latin-1, was one document."""
    location = tmp_path / "src"
    if name == "devil":  # the bytes as one entry, CAT as the next
        location = dictd(tmp_path, data + CAT, f"junk\tA\t{b64(len(data))}\ncat\t{b64(len(data))}\t{b64(len(CAT))}\n")
    else:
        location.mkdir()
        (location / "wisdom").write_bytes(data + b"\n%\n" + CAT.replace(b"CAT", b"DOG"))
    assert cli.main(["data", "prepare", str(tmp_path / "out"), f"sources={name}", f"location={name}={location}"]) == 0
    out = capsys.readouterr().out
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["sources"][name]
    texts = [json.loads(line)["text"] for line in (tmp_path / "out" / "text" / f"{name}.jsonl").open()]
    assert all(t.startswith(("CAT", "DOG")) for t in texts), texts
    assert entry["not_text"] >= 1 and f"not_text {entry['not_text']}" in out, (entry, out)


def test_a_conversation_that_is_no_text_is_dropped_and_counted(tmp_path):
    """JSON escapes spell any character: a conversation of C1 controls became a dialog and a document."""
    good, bad = "Hello there, how are you today?", "\x85\x9c word " * 50
    data = {key: {"messages": [[{"text": text}], [{"text": text.replace("?", "!")}]]}
            for key, text in (("c0", good), ("c1", bad))}
    (tmp_path / "d.json").write_text(json.dumps(data))
    entry = prepare(tmp_path / "out", sources=["chitchat"], locations={"chitchat": tmp_path / "d.json"},
                    val_fraction=0)["sources"]["chitchat"]
    assert "word" not in (tmp_path / "out" / "dialogs-train.jsonl").read_text()
    assert (entry["documents"], entry["not_text"], entry["dialogs"], entry["dialogs_not_text"]) == (1, 1, 1, 1)
