"""Ingest at machine speed: the bf16 encoder against the fp32 one, batching across files against
one file at a time, a killed `parley ingest` run resumed, and the progress line. Real MiniLM,
real SQLite, a real subprocess."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from parley.pipeline.embed import Embedder, EmbedderError, bf16_faster, fast_bf16, resolve_precision
from parley.pipeline.knowledge import ingest, ingest_main
from parley.store import Store

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "hello",
    "How do I kill a python process that hangs?",
    "",
    "The default value of the timeout argument is None, which means wait forever. " * 12,
    "asyncio.gather(*aws, return_exceptions=False) runs awaitable objects concurrently.",
    "word " * 600,  # cut at 256 word pieces
    "Rent is due on the first working day of each month.",
]


@pytest.fixture(scope="module")
def fp32():
    return Embedder.load(precision="fp32")


@pytest.fixture(scope="module")
def bf16():
    return Embedder.load(precision="bf16", path="torch")  # as `parley ingest` loads it: oneDNN's bf16 throughout


def test_bf16_vectors_agree_with_fp32(fp32, bf16):
    """The tolerance benchmarks/RESULTS.md states: every bf16 vector within cosine 0.999 of the
    fp32 one (measured minimum on Python-docs chunks: 0.99993)."""
    a, b = fp32(TEXTS, remember=False), bf16(TEXTS, remember=False)
    assert b.dtype == np.float32 and b.shape == a.shape
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosines = (a * b).sum(1)
    assert cosines.min() >= 0.999, cosines
    assert not np.array_equal(a, b)  # it did run in another precision


def test_precision_is_chosen_by_cpu_flags(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    yes, no = (lambda: True), (lambda: False)
    assert resolve_precision("auto", {"avx512f", "amx_bf16", "amx_tile"}, faster=no) == "bf16"  # tiles: no timing
    epyc = {"avx512f", "avx512_bf16", "avx512_vnni"}  # AMD EPYC: bf16 dot products, no tiles
    assert resolve_precision("auto", epyc, faster=yes) == "bf16"
    assert resolve_precision("auto", epyc, faster=no) == "fp32"
    assert resolve_precision("auto", {"avx2", "fma"}, faster=yes) == "fp32"
    assert resolve_precision("fp32", {"amx_bf16"}) == "fp32"  # forced
    assert resolve_precision("bf16", {"avx2"}) == "bf16"
    # --no-amx's emulation: oneDNN capped below the tiles counts as a CPU without them
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert resolve_precision("auto", {"avx512f", "avx512_bf16", "amx_bf16"}, faster=no) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert resolve_precision("auto", {"avx512f", "avx512_bf16", "amx_bf16"}, faster=no) == "bf16"
    assert fast_bf16(set()) is False
    with pytest.raises(EmbedderError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("int4")
    assert isinstance(bf16_faster(rows=32), bool)  # the real timing runs
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert Embedder.load(precision="auto").precision == resolve_precision("auto")


def _folder(tmp_path: Path, n: int, words: int = 30) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(n):
        body = " ".join(f"note{i} line {j} about the heron colony on island {i % 7}." for j in range(words // 8 + 1))
        (folder / f"f{i:03d}.txt").write_text(body)
    return folder


def _vectors(db: Path) -> dict[str, bytes]:
    with sqlite3.connect(db) as c:
        return dict(c.execute("SELECT d.name || '#' || k.ord, k.embedding FROM chunks k "
                              "JOIN documents d ON d.id = k.document_id"))


def test_batching_across_files_equals_one_file_at_a_time(tmp_path, fp32):
    folder = _folder(tmp_path, 4, words=240)  # two chunks each
    (folder / "twin.txt").write_bytes((folder / "f000.txt").read_bytes())  # the same bytes twice in one run
    stored = {}
    for batch in (1, 512):
        with Store(tmp_path / f"{batch}.db") as store:
            user = store.add_user("ann").id
            results = ingest(store, fp32, user, [folder], batch_chunks=batch)
        assert [r.name for r in results] == sorted(p.name for p in folder.iterdir())  # in the files' order
        assert [r.status for r in results] == ["stored"] * 4 + ["skipped"]
        assert "the same content as f000.txt" in results[-1].message
        stored[batch] = _vectors(tmp_path / f"{batch}.db")
    assert stored[1].keys() == stored[512].keys() and len(stored[1]) == 8
    for key, blob in stored[1].items():
        a, b = np.frombuffer(blob, np.float32), np.frombuffer(stored[512][key], np.float32)
        assert float(a @ b) > 0.99999, key


def _count(db: Path) -> tuple[int, int, int]:
    """(documents, chunks, chunks whose document is missing) as another process sees them."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
            docs = c.execute("SELECT count(*) FROM documents").fetchone()[0]
            chunks = c.execute("SELECT count(*) FROM chunks").fetchone()[0]
            orphans = c.execute("SELECT count(*) FROM chunks WHERE document_id NOT IN "
                                "(SELECT id FROM documents)").fetchone()[0]
            return docs, chunks, orphans
    except sqlite3.OperationalError:  # not created yet
        return 0, 0, 0


def _around_a_large_file(tmp_path: Path, small: list[str]) -> tuple[Path, Path, list[str], dict]:
    """A folder of small notes and b_large.txt, which takes many seconds to embed on any CPU (the
    small names sort around it as they are chosen); `parley ingest`'s command line and environment."""
    folder, db = tmp_path / "docs", tmp_path / "kb.db"
    folder.mkdir()
    for name in small:
        (folder / f"{name}.txt").write_text(f"Note {name} about the heron colony on the island of {name}.")
    (folder / "b_large.txt").write_text("\n\n".join(f"Paragraph {i} tells of herons and egrets nesting. " * 20
                                                    for i in range(2000)))
    command = [sys.executable, "-m", "parley", "ingest", str(folder), "--db", str(db), "--precision", "fp32",
               "--batch-chunks", "1"]
    return folder, db, command, {**os.environ, "PYTHONPATH": str(ROOT), "PARLEY_HOME": str(tmp_path / "home")}


def test_a_killed_ingest_resumes_where_it_stopped(tmp_path):
    """Five small files, then one so large that embedding it takes many seconds on any CPU, then
    five small ones: the run is killed while the large one is in flight, so where it stops does
    not depend on the machine's speed."""
    folder, db, command, env = _around_a_large_file(tmp_path, [f"a{i}" for i in range(5)] + [f"c{i}" for i in range(5)])
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while _count(db)[0] < 5 and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)  # no chance to clean up: what is on disk is what a crash leaves
    run.wait()
    assert run.returncode == -signal.SIGKILL, run.stderr.read().decode()
    assert _count(db) == (5, 5, 0)  # the five small files, nothing of the large one, no orphan chunks

    (folder / "b_large.txt").write_text("The large file, rewritten small after the crash.")
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if "skipped (unchanged" in line] == [f"a{i}.txt" for i in range(5)]
    assert sum(": stored 1 chunk" in line for line in lines) == 6
    assert "11 files in" in lines[-1] and "6 stored" in lines[-1] and "5 unchanged" in lines[-1]
    assert _count(db) == (11, 11, 0)


def test_a_killed_ingest_takes_its_reader_process_with_it(tmp_path):
    """A folder (16 files or more) is read by a process of its own; `parley ingest` killed
    outright must not leave it behind, and what was stored stays whole."""
    _, db, command, env = _around_a_large_file(tmp_path, [f"a{i:02d}" for i in range(20)])
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while _count(db)[0] < 20 and run.poll() is None:  # the large file is next: the reader has read ahead
        time.sleep(0.05)
    children = {int(c) for task in Path(f"/proc/{run.pid}/task").iterdir()
                for c in (task / "children").read_text().split()}
    readers = {c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")}
    assert readers, "no reader process was started"
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert _count(db) == (20, 20, 0)
    deadline = time.monotonic() + 60
    while readers and time.monotonic() < deadline:  # the kernel delivers the parent-death signal at once
        readers = {c for c in readers if Path(f"/proc/{c}").exists() and
                   Path(f"/proc/{c}/stat").read_text().split(") ")[-1][0] != "Z"}
        time.sleep(0.05)
    assert not readers, f"reader process {readers} outlived the killed ingest"


def test_progress_line_on_stderr_only_when_asked(tmp_path, capsys):
    folder = _folder(tmp_path, 3)
    db = tmp_path / "kb.db"
    assert ingest_main([str(folder), "--db", str(db), "--precision", "fp32"]) == 0  # auto: stderr is no terminal
    captured = capsys.readouterr()
    assert captured.err == "" and "chunks/s, fp32 encoder" in captured.out.splitlines()[-1]
    (folder / "new.txt").write_text("A new note about kingfishers.")
    assert ingest_main([str(folder), "--db", str(db), "--progress", "on", "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("\r\x1b[K")
    assert "4/4 files, 1 chunks, " in captured.err and " chunks/s, " in captured.err
    assert captured.err.endswith(" s\n")
    assert ingest_main([str(folder), "--db", str(db), "--precision", "fp16"]) == 2
    assert "precision" in capsys.readouterr().err
    assert ingest_main([str(folder), "--db", str(db), "--batch-chunks", "0"]) == 2
    assert "batch_chunks must be at least 1" in capsys.readouterr().err


def test_a_folder_is_read_by_a_process_with_the_same_result(tmp_path, monkeypatch, fp32):
    """A folder of 16 or more files is read by a reader process of its own (trafilatura would
    otherwise hold the interpreter the encoder needs): same statuses, messages, chunks and
    vectors as the reader thread, a twin skipped and a bad file an error either way."""
    import multiprocessing

    from parley.pipeline import knowledge

    folder = _folder(tmp_path, 18, words=240)
    (folder / "twin.txt").write_bytes((folder / "f003.txt").read_bytes())
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a real pdf")
    seen, runs = {}, {}
    for how, start in (("process", knowledge._Reader.PROCESS_FROM), ("thread", 10_000)):
        monkeypatch.setattr(knowledge._Reader, "PROCESS_FROM", start)
        children = []
        with Store(tmp_path / f"{how}.db") as store:
            user = store.add_user("ann").id
            runs[how] = ingest(store, fp32, user, [folder], batch_chunks=7,
                               progress=lambda r: children.append(len(multiprocessing.active_children())))
        seen[how] = max(children)
    assert seen == {"process": 1, "thread": 0}
    assert [(r.name, r.status, r.chunks, r.message) for r in runs["process"]] == \
           [(r.name, r.status, r.chunks, r.message) for r in runs["thread"]]
    statuses = {r.name: r.status for r in runs["process"]}
    assert statuses["twin.txt"] == "skipped" and statuses["broken.pdf"] == "error"
    assert sum(s == "stored" for s in statuses.values()) == 18
    assert _vectors(tmp_path / "process.db").keys() == _vectors(tmp_path / "thread.db").keys()
    for key, blob in _vectors(tmp_path / "process.db").items():
        assert float(np.frombuffer(blob, np.float32) @ np.frombuffer(_vectors(tmp_path / "thread.db")[key], np.float32)) > 0.99999


def test_the_encoder_gets_its_core_back_as_soon_as_the_reader_is_done(fp32):
    """`ingest` embeds a batch of chunks in parts, on one thread fewer only while the reader is
    still reading: the same vectors, in the texts' order, as one call."""
    import torch

    from parley.pipeline.knowledge import _embed_beside

    texts = [f"Chunk {i}: " + "herons nest on the island " * (i % 7 + 1) for i in range(150)]
    threads, ran = torch.get_num_threads(), []

    def encoder(batch):
        ran.append((len(batch), torch.get_num_threads()))
        return fp32.encode(batch, remember=False)

    answers = iter([True])  # the reader is busy at the first part, then done
    vectors = _embed_beside(encoder, texts, lambda: next(answers, False), part=64)
    assert [n for n, _ in ran] == [64, 64, 22]
    assert [t for _, t in ran] == [threads - 1 if threads > 1 else 1, threads, threads]
    assert torch.get_num_threads() == threads
    whole = fp32.encode(texts, remember=False)
    assert vectors.shape == whole.shape and ((vectors * whole).sum(1) > 0.99999).all()
    assert _embed_beside(encoder, [], lambda: True).shape == (0, 0)
