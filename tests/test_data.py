"""Corpus readers, prepare/tokenize, TokenShards and ChatDataset on tiny synthetic files in the real formats."""

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from parley import cli
from parley.model.tokenizer import Tokenizer
from parley.train import corpus
from parley.train.corpus import SOURCES, prepare, tokenize
from parley.train.data import ChatDataset, TokenShards, chat_tokens

ROOT = Path(__file__).resolve().parents[1]
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64(n: int) -> str:
    digits = ""
    while True:
        digits, n = B64[n % 64] + digits, n // 64
        if not n:
            return digits


def write_dictd(folder: Path, name: str, entries: dict[str, str]) -> Path:
    """A dictd database: gzip'd text plus an index of headword, base64 offset and length."""
    data, index = b"", []
    for head, text in {"00-database-short": "00-database-short\n   A test dictionary\n", **entries}.items():
        raw = text.encode()
        index.append(f"{head}\t{b64(len(data))}\t{b64(len(raw))}")
        data += raw
    index.append(index[-1].replace(list(entries)[-1], "alias", 1))  # two headwords, one entry
    (folder / f"{name}.index").write_text("\n".join(index) + "\n")
    path = folder / f"{name}.dict.dz"
    path.write_bytes(gzip.compress(data))
    return path


def compress_literals(data: bytes) -> bytes:
    """Unix compress (LZW) codes that spell every byte as a literal: valid, if no smaller."""
    return lzw_codes(list(data))


def lzw_codes(codes: list[int]) -> bytes:
    """The bit string of Unix compress codes as its decoder reads them: the decoder defines a table entry
    for each code after the first and widens codes when the table fills, skipping the rest of compress's
    group of 8 codes; this mirrors that."""
    acc = pos = start = 0
    bits, size = 9, 257
    for i, code in enumerate(codes):
        acc |= code << pos
        pos += bits
        size += i > 0
        if size >= 1 << bits:
            group = bits * 8
            pos = start = start + -(-(pos - start) // group) * group
            bits += 1
    return acc.to_bytes((pos + 7) // 8, "little")


def write_bible(path: Path, text: str, window: int = 700) -> Path:
    raw = text.encode()
    windows = [compress_literals(raw[i:i + window]) for i in range(0, len(raw), window)]
    offsets, at = [], 92 + 4 * (len(windows) + 1) + 3
    for w in windows + [b""]:
        offsets.append(at)
        at += len(w)
    header = b"EC02Compressed Data File".ljust(84, b"\0") + struct.pack(">II", window, len(windows))
    path.write_bytes(header + struct.pack(f">{len(offsets)}I", *offsets) + b"\x1f\x9d\x90" + b"".join(windows))
    return path


VERSE = "And the earth was without form, and void; and darkness was upon the face of the deep."
BIBLE = ("Holy Bible, Authorized (King James) Version.\n"
         + "".join(f"Ge1:{v} {VERSE} ({v})\n" for v in range(1, 8)) + f"Ge2:1 {VERSE}\nEx1:1 {VERSE} Exodus.\n")
DEVIL_CAT = "CAT, n.  A soft, indestructible automaton provided by nature to be\nkicked when things go wrong.\n"
RST = """\
.. _tut-intro:

**********************
An Informal Introduction
**********************

.. index:: single: comment

The :func:`print` function writes ``text``; see :ref:`the tutorial <tut-x>`
and :mod:`~os.path`. For example::

   >>> print("hi")
   hi

.. function:: greet(name)

   Say hello to *name*.

   .. versionadded:: 3.2
"""
CHITCHAT = {
    "c1": {"messages": [[{"text": "Hello", "sender": "a"}, {"text": "How are you?", "sender": "a"}],
                        [{"text": "Fine, thanks!", "sender": "b"}],
                        [{"text": "Great to hear that", "sender": "a"}]]},
    "c2": {"messages": [[{"text": "Is anyone there at all?", "sender": "a"}]]},
    "c3": {"messages": [[{"text": "What is your favourite food?", "sender": "a"}],
                        [{"text": "Pizza, without a doubt.", "sender": "b"}]]},
}
CHATTERBOT = """\
categories:
- food
conversations:
- - Do you like pizza?
  - yes
- - What is AI?
  - Artificial Intelligence is the branch of engineering devoted to constructing machines that think.
- - What is AI?
  - Artificial Intelligence is the branch of engineering devoted to constructing machines that think.
- - "Tell me a joke: a good one"
  - Why did the chicken cross the road?
  - Why?
  - To get to the other side.
"""


@pytest.fixture(scope="module")
def locations(tmp_path_factory) -> dict[str, Path]:
    """Every source in its real format, a few documents each."""
    root = tmp_path_factory.mktemp("sources")
    loc = {"gcide": write_dictd(root, "gcide", {
        "Caf\u00e9": "Caf['e] \\Ca*f['e]\"\\ (k[.a]*f[=a]\"), n. [F.]\n   A coffee house; a {restaurant}.\n"
                     "   [1913 Webster]\n",
        "Cat": "Cat \\Cat\\ (k[a^]t), n. [AS. cat.]\n   A small domesticated {carnivore} that people keep, and\n"
               "   which keeps them in turn.\n   [1913 Webster]\n"})}
    (root / "wordnet").mkdir()
    (root / "wordnet" / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by  \n"
        "00217593 04 n 01 kill 1 002 @ 00217014 n 0000 + 00355365 v 0101 | the destruction of an enemy plane; "
        '"the pilot reported two kills"  \n'
        "00217499 04 n 02 laying_waste 0 ruin 0 001 @ 00217014 n 0000 | an act that has disastrous consequences  \n")
    (root / "wordnet" / "data.adj").write_text(
        "00095873 00 s 02 asleep(p) 0 deceased 0 001 & 00095280 a 0000 | dead; \"he is deceased\"; \"our friend\"  \n")
    loc["wordnet"] = root / "wordnet"
    (root / "docs" / "tutorial").mkdir(parents=True)
    (root / "docs" / "tutorial" / "introduction.rst.txt").write_text(RST)
    loc["python-docs"] = root / "docs"
    loc["bible-kjv"] = write_bible(root / "bible.data", BIBLE)
    loc["foldoc"] = write_dictd(root, "foldoc", {
        "actor": "actor\n\n   1. <programming> In {object-oriented} programming, an {object}\n"
                 "   which exists as a {concurrent} process.\n\n   (1994-11-08)\n"})
    loc["jargon"] = write_dictd(root, "jargon", {"cat": DEVIL_CAT, "blue wire": "blue wire\n n.\n\n"
                                                 "    [IBM] Patch wires added to circuit boards at the factory.\n"})
    loc["devil"] = write_dictd(root, "devil", {"cat": DEVIL_CAT, "monday": "MONDAY, n.  In Christian countries, "
                                               "the day after the baseball game.\n"})
    (root / "fortunes").mkdir()
    (root / "fortunes" / "wisdom").write_text(
        "A clash of doctrine is not a disaster -- it is an opportunity.\n%\nGo.\n%\n"
        "_\bB_\bo_\bl_\bd words are underlined here, so to speak.\n\t\t-- Anon\n%\n")
    (root / "fortunes" / "wisdom.dat").write_bytes(b"\x00\x00\x00\x02\xff\xfe%")
    (root / "fortunes" / "wisdom.u8").symlink_to("wisdom")
    loc["fortunes"] = root / "fortunes"
    (root / "sotu").mkdir()
    for year, name in ((1790, "George Washington"), (2011, "Barack Obama")):
        (root / "sotu" / f"{year}_x.json").write_text(json.dumps(
            {"year": year, "name": name, "party": "none", "text": f"Fellow citizens: the state of {year} is good."}))
    loc["sotu"] = root / "sotu"
    (root / "chitchat.json").write_text(json.dumps(CHITCHAT))
    loc["chitchat"] = root / "chitchat.json"
    (root / "chatterbot").mkdir()
    (root / "chatterbot" / "food.yml").write_text(CHATTERBOT)
    loc["chatterbot"] = root / "chatterbot"
    assert set(loc) == set(SOURCES)  # every source hermetic: none read from this machine's packages
    return loc


def docs(name: str, locations) -> list[str]:
    source = SOURCES[name]
    return [source.clean_text(d) for d in source.text(locations[name])]


# ---- readers ----

def test_dictd_readers(locations):
    assert docs("gcide", locations) == ["Café, n. [F.]\nA coffee house; a restaurant.",
                                        "Cat, n. [AS. cat.]\nA small domesticated carnivore that people keep, "
                                        "and which keeps them in turn."]
    assert docs("foldoc", locations) == ["actor\n\n1. In object-oriented programming, an object which exists "
                                         "as a concurrent process."]
    assert docs("devil", locations)[0] == ("CAT, n. A soft, indestructible automaton provided by nature to be "
                                           "kicked when things go wrong.")


def test_wordnet_reader(locations):
    assert docs("wordnet", locations) == [
        'kill (noun): the destruction of an enemy plane.\nExample: "the pilot reported two kills"',
        "laying waste, ruin (noun): an act that has disastrous consequences.",
        'asleep, deceased (adjective): dead.\nExample: "he is deceased"\nExample: "our friend"']


def test_rst_reader(locations):
    (text,) = docs("python-docs", locations)
    assert text == ("An Informal Introduction\n\nThe `print` function writes `text`; see the tutorial\n"
                    "and `path`. For example:\n\n   >>> print(\"hi\")\n   hi\n\ngreet(name)\n"
                    "\nSay hello to *name*.\n\nNew in version 3.2.")


def test_rst_near_miss_underline_is_text():
    # a run of "=" that is not a heading: the underline pattern must fail fast (no exponential backtracking)
    assert corpus.rst_text("Title\n" + "=" * 40 + " x\n") == "Title\n" + "=" * 40 + " x"


def test_bible_reader_decodes_compress_windows(locations):
    chapters = docs("bible-kjv", locations)
    assert len(chapters) == 3
    assert chapters[0].split("\n")[:3] == ["Genesis 1", "", f"{VERSE} (1)"]
    assert chapters[0].count(VERSE) == 7
    assert chapters[2] == f"Exodus 1\n\n{VERSE} Exodus."
    text = BIBLE.encode() * 3  # long enough that codes widen twice: 9 -> 10 -> 11 bits
    assert corpus.unlzw(compress_literals(text)) == text


def test_fortunes_sotu_chitchat_chatterbot(locations):
    assert docs("fortunes", locations) == [
        "A clash of doctrine is not a disaster -- it is an opportunity.", "Go.",
        "Bold words are underlined here, so to speak.\n                -- Anon", ""]
    assert docs("sotu", locations)[0] == ("State of the Union address by George Washington, 1790.\n\n"
                                          "Fellow citizens: the state of 1790 is good.")
    assert docs("chitchat", locations)[0] == "A: Hello\nHow are you?\nB: Fine, thanks!\nA: Great to hear that"
    chats = list(SOURCES["chitchat"].dialogs(locations["chitchat"]))
    assert chats[0][:2] == [{"role": "user", "content": "Hello\nHow are you?"},
                            {"role": "assistant", "content": "Fine, thanks!"}]
    bot = list(SOURCES["chatterbot"].dialogs(locations["chatterbot"]))
    assert bot[0][1] == {"role": "assistant", "content": "yes"}  # a string, not YAML's True
    assert [m["role"] for m in bot[3]] == ["user", "assistant", "user", "assistant"]


def test_clean_normalizes():
    # NFC, NBSP to a space, the tab to column 8, trailing spaces, blank lines and the bell gone, dedented
    assert corpus.clean("  Cafe\u0301\r\n\u00a0 x\t y  \n\n\n\n  z\x07") == "Café\nx      y\n\nz"


# ---- prepare and tokenize ----

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, locations) -> Tokenizer:
    """A byte-level BPE with the ChatML template, trained on the synthetic documents."""
    file = tmp_path_factory.mktemp("tok") / "train.txt"
    text = "\n\n".join(d for name, s in SOURCES.items() if s.text for d in docs(name, locations))
    file.write_text(text + "\nuser assistant system Hello! How are you? Fine, thanks.\n")
    return Tokenizer.train([file], vocab_size=400)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, locations, tokenizer):
    out = tmp_path_factory.mktemp("data")
    missing = {**locations, "sotu": out / "no-such-folder"}
    manifest = prepare(out, locations=missing, val_fraction=0.3, seed=0)
    tokenize(out, tokenizer, val_fraction=0.3, seed=0, shard_tokens=200)  # several shards per split
    return out, manifest


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prepare_manifest_and_skips(prepared, capsys, tmp_path, locations):
    out, manifest = prepared
    gcide = manifest["sources"]["gcide"]
    assert (gcide["documents"], gcide["words"], gcide["license"], gcide["package"]) == \
        (2, 25, "GPL-2.0-or-later", "apt:dict-gcide")
    assert "no-such-folder not found" in manifest["sources"]["sotu"]["skipped"]
    assert not (out / "text" / "sotu.jsonl").exists()
    assert manifest["sources"]["devil"]["duplicates"] == 1  # its CAT entry is jargon's, read first
    assert manifest["sources"]["fortunes"]["too_short"] == 2  # "Go." and the empty one
    assert manifest["sources"]["chatterbot"]["dialog_duplicates"] == 1
    prepare(tmp_path, sources=["devil"], locations={"devil": tmp_path / "gone.dict.dz"})
    assert "skipping source devil" in capsys.readouterr().err


def test_dialog_splits(prepared):
    out, manifest = prepared
    train, val = read_jsonl(out / "dialogs-train.jsonl"), read_jsonl(out / "dialogs-val.jsonl")
    assert len(train) + len(val) == manifest["dialogs"]["train"] + manifest["dialogs"]["val"] == 5
    assert val and not {json.dumps(c) for c in train} & {json.dumps(c) for c in val}
    for conversation in train + val:
        roles = [m["role"] for m in conversation["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant" and conversation["source"] in ("chitchat", "chatterbot")


def test_shards_decode_to_the_cleaned_text(prepared, tokenizer):
    out, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == tokenizer.vocab_size and manifest["tokenizer"]["dtype"] == "uint16"
    assert len(manifest["shards"]["train"]) > 1
    texts = {d["text"] for f in (out / "text").glob("*.jsonl") for d in read_jsonl(f)}
    split_docs = {}
    for split in ("train", "val"):
        stream = np.concatenate([np.fromfile(out / s["file"], np.uint16) for s in manifest["shards"][split]])
        assert stream[-1] == tokenizer.eot_id and len(stream) == manifest["tokens"][split]
        cuts = np.flatnonzero(stream == tokenizer.eot_id)
        split_docs[split] = [tokenizer.decode(d) for d in np.split(stream, cuts + 1)[:-1]]
    assert split_docs["val"] and not set(split_docs["train"]) & set(split_docs["val"])
    assert sorted(split_docs["train"] + split_docs["val"]) == sorted(texts)
    assert sum(e.get("tokens", 0) for e in manifest["sources"].values()) == sum(manifest["tokens"].values())


def test_prepare_with_tokenizer_and_bad_input(tmp_path, locations, tokenizer):
    manifest = prepare(tmp_path, sources=["devil"], locations=locations, tokenizer=tokenizer)
    assert manifest["sources"]["devil"]["tokens"] > 0 and manifest["tokens"]["val"] == 0
    with pytest.raises(ValueError, match="unknown source"):
        prepare(tmp_path, sources=["nope"])
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(tmp_path, val_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="run `parley data prepare .*empty` first"):
        tokenize(tmp_path / "empty", tokenizer)


# ---- TokenShards ----

def test_token_shards_batches_are_a_function_of_the_position(prepared):
    out, _ = prepared
    shards = TokenShards(out, "train")
    a = shards.batch(step=3, micro=0, rank=0, world=1, batch_size=8, seq_len=16, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, shards.batch(3, 0, 0, 1, 8, 16, seed=1)))
    assert not torch.equal(a[0], shards.batch(4, 0, 0, 1, 8, 16, seed=1)[0])
    assert a[0].shape == (8, 16) and a[0].dtype == torch.long and torch.equal(a[0][:, 1:], a[1][:, :-1])
    # two ranks of 4 rows, or two micro-steps of 4, read the same 8 windows as one rank of 8
    ranks = [shards.batch(3, 0, r, 2, 4, 16, seed=1)[0] for r in range(2)]
    micros = [shards.batch(3, m, 0, 1, 4, 16, seed=1)[0] for m in range(2)]
    assert torch.equal(torch.cat(ranks), a[0]) and torch.equal(torch.cat(micros), a[0])
    # micro-step 1 of 2 ranks is the second global block of 8 whatever the split
    second = torch.cat([shards.batch(3, 1, r, 2, 4, 16, seed=1)[0] for r in range(2)])
    assert torch.equal(second, shards.batch(3, 1, 0, 1, 8, 16, seed=1)[0])


def test_token_shards_windows_span_shards_and_eval_is_contiguous(prepared):
    out, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    stream = np.concatenate([np.fromfile(out / s["file"], np.uint16) for s in manifest["shards"]["train"]])
    shards = TokenShards(out)
    assert shards.num_tokens == len(stream) and shards.vocab_size == manifest["tokenizer"]["vocab_size"]
    batches = list(shards.eval_batches(batch_size=4, seq_len=50))
    inputs = torch.cat([b[0] for b in batches])
    assert len(inputs) == (len(stream) - 1) // 50 and len(batches[-1][0]) <= 4
    assert torch.equal(inputs.flatten(), torch.from_numpy(stream[:len(inputs) * 50].astype(np.int64)))
    assert len(list(shards.eval_batches(4, 50, max_batches=2))) == 2
    inputs, targets = shards.batch(0, 0, 0, 1, 32, 150, seed=0)  # 150 > 200-token shards: windows cross them
    for row, target in zip(inputs.numpy(), targets.numpy()):
        starts = [o for o in np.flatnonzero(stream == row[0]) if np.array_equal(stream[o:o + 150], row)]
        assert starts and np.array_equal(stream[starts[0] + 1:starts[0] + 151], target)


def test_token_shards_errors(prepared, tmp_path, locations, tokenizer):
    out, _ = prepared
    with pytest.raises(FileNotFoundError, match="not found"):
        TokenShards(tmp_path / "missing")
    with pytest.raises(ValueError, match="seq_len 100000 needs"):
        TokenShards(out).batch(0, 0, 0, 1, 2, 100000)
    with pytest.raises(ValueError, match="rank 2 must be below world 2"):
        TokenShards(out).batch(0, 0, 2, 2, 2, 8)
    prepare(tmp_path, sources=["devil"], locations=locations, val_fraction=0, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="val split .* is empty"):
        TokenShards(tmp_path, "val")
    (tmp_path / "train-000.bin").unlink()
    with pytest.raises(FileNotFoundError, match="train-000.bin is missing"):
        TokenShards(tmp_path)


# ---- ChatDataset ----

CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi. Café?"}, {"role": "user", "content": "How are you?"},
                {"role": "assistant", "content": "Fine, thanks."}]


def assert_exact_mask(tok: Tokenizer, messages, end="<|im_end|>"):
    ids, mask = chat_tokens(tok, messages)
    assert ids == tok.encode_chat(messages, add_generation_prompt=False)
    masked = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert masked == "".join(m["content"] + end for m in messages if m["role"] == "assistant")


def test_chat_mask_chatml(tokenizer):
    assert_exact_mask(tokenizer, CONVERSATION)
    assert_exact_mask(tokenizer, CONVERSATION[1:])


def test_chat_mask_smollm2(smollm2_path):
    if not smollm2_path.is_file():
        pytest.skip(f"{smollm2_path} missing")
    tok = Tokenizer.from_gguf(smollm2_path)
    assert_exact_mask(tok, CONVERSATION)
    assert_exact_mask(tok, CONVERSATION[1:])  # the template adds its own system prompt: still unmasked
    assert "SmolLM" in tok.render_chat(CONVERSATION[1:])


@pytest.fixture
def dialogs(tmp_path) -> Path:
    rows = [CONVERSATION, CONVERSATION[1:3],
            [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "cut off"}]]
    path = tmp_path / "dialogs.jsonl"
    path.write_text("".join(json.dumps({"messages": m, "source": "test"}) + "\n" for m in rows) + "\n")
    return path


def test_chat_dataset_batches(dialogs, tokenizer):
    data = ChatDataset(dialogs, tokenizer, seq_len=48)
    assert len(data) == 2 and data.dropped == 1  # the third answer lies past seq_len
    inputs, targets, mask = data.batch(step=0, micro=0, rank=0, world=1, batch_size=6, seed=0)
    width = max(len(ids) - 1 for ids, _ in data.examples)  # the longest row, not seq_len
    assert inputs.shape == targets.shape == mask.shape == (6, width) and mask.dtype == torch.bool
    assert torch.equal(inputs[:, 1:][mask[:, :-1]], targets[:, :-1][mask[:, :-1]])  # shifted by one
    expected = {"".join(c["content"] + "<|im_end|>" for c in conv if c["role"] == "assistant")
                for conv in (CONVERSATION, CONVERSATION[1:3])}
    for row in range(6):
        assert tokenizer.decode(targets[row][mask[row]], skip_special_tokens=False) in expected
    halves = [data.batch(0, 0, r, 2, 3, seed=0) for r in range(2)]  # each half as wide as its own longest row
    for i, x in enumerate((inputs, targets, mask)):
        fill = data.pad_id if i < 2 else False
        assert torch.equal(torch.cat([torch.nn.functional.pad(h[i], (0, width - h[i].shape[1]), value=fill)
                                      for h in halves]), x)
    evals = list(data.eval_batches(batch_size=1))
    assert len(evals) == 2  # every conversation once, in file order
    for (inputs, _, mask), (ids, m) in zip(evals, data.examples):
        assert torch.equal(inputs[0], torch.from_numpy(ids[:-1]))  # as wide as the row itself
        assert torch.equal(mask[0, :len(m) - 1], torch.from_numpy(m[1:]))


def test_chat_dataset_errors(tmp_path, tokenizer, dialogs):
    with pytest.raises(FileNotFoundError, match="not found"):
        ChatDataset(tmp_path / "none.jsonl", tokenizer, 32)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        ChatDataset(tmp_path / "empty.jsonl", tokenizer, 32)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(dialogs.read_text().splitlines()[0] + '\n{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: message 0 needs a role"):
        ChatDataset(bad, tokenizer, 32)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        ChatDataset(bad, tokenizer, 32)
    with pytest.raises(ValueError, match="keeps an assistant token"):
        ChatDataset(dialogs, tokenizer, 4)


# ---- what a newcomer reads: real commands, their own paths ----

def test_errors_name_real_commands_and_the_users_paths(prepared, tmp_path, tokenizer, capsys):
    out, _ = prepared
    missing = tmp_path / "my-corpus"
    with pytest.raises(FileNotFoundError, match=f"run `parley data prepare {missing} --tokenizer"):
        TokenShards(missing)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "train-000.bin", "ab") as f:  # a shard that does not match its manifest
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=f"manifest says .*: run `parley data prepare {copy} --tokenizer"):
        TokenShards(copy)
    with pytest.raises(FileNotFoundError, match=f"run `parley data prepare {missing}` first"):
        ChatDataset(missing / "dialogs-train.jsonl", tokenizer, 32)
    empty = tmp_path / "empty-corpus"
    (empty / "text").mkdir(parents=True)
    (empty / "text" / "gcide.jsonl").write_text("")
    assert cli.main(["train", "tokenizer", f"data={empty}", f"out={tmp_path / 'tok'}"]) == 2
    err = capsys.readouterr().err
    assert f"the cleaned text in {empty}/text is empty (gcide.jsonl)" in err and "make data-sources" in err
    assert "/tmp/tmp" not in err  # not the trainer's temporary file
    assert cli.main(["train", "tokenizer", f"data={missing}", f"out={tmp_path / 'tok'}"]) == 2
    assert f"run `parley data prepare {missing}` first" in capsys.readouterr().err
    assert cli.main(["train", "pretrain", str(ROOT / "recipes" / "pretrain-tiny.toml"), f"data={out}",
                     f"tokenizer={tmp_path / 'no-tokenizer'}", f"run={tmp_path / 'run'}"]) == 2
    assert f"train one with `parley train tokenizer data={out} out={tmp_path / 'no-tokenizer'}`" in \
        capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_data_prepare_with_every_source_missing_fails_and_says_what_to_install(tmp_path, capsys):
    gone = [f"location={name}={tmp_path / 'nowhere' / name}" for name in SOURCES]
    assert cli.main(["data", "prepare", str(tmp_path / "out"), *gone]) == 2
    err = capsys.readouterr().err
    assert "every source is missing" in err and "`make data-sources`" in err and "apt:dict-gcide" in err
    with pytest.raises(SystemExit) as exit:
        cli.main(["data", "--help"])
    assert exit.value.code == 0 and "prepare" in capsys.readouterr().out
