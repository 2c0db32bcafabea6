"""The user's knowledge base: ingest files, then find passages by hybrid search, with citations.

    store, embedder = Store("parley.db"), Embedder.load()
    ingest(store, embedder, user_id, [Path("notes/")])   # per file: stored / skipped / error
    passages = retrieve(store, embedder, user_id, "when is the rent due?", k=3)
    passages[0].text                                      # the chunk, verbatim
    print(format_citations(passages))                     # "[1] notes.txt, chunk 3" ...

    parley ingest notes/ --user ann --collection home     # the same from the command line

Ingestion reads each file (parley.pipeline.readers), cuts it into overlapping chunks, embeds
them in one batch and stores the document, its chunks and their vectors in one transaction, so
a failure at any point leaves nothing of that document behind. A file whose bytes are already
in the collection (same sha256) is skipped; a changed file at the same path replaces its older
version in that same transaction.

Retrieval fuses two rankings by reciprocal rank fusion (score = sum of 1 / (60 + rank)): BM25
over SQLite's full-text index, which wins on rare exact words (names, codes, API names), and
cosine similarity of MiniLM embeddings, which wins on paraphrases. BM25 leaves out the query's
most common English words and the dense list chunks under a cosine of 0.2: both match nearly
everything, and in a small knowledge base, where every chunk would be in both lists, they would
outrank a paraphrase that only one ranking finds. The user's vectors live in a numpy matrix
cached per user and collection, reloaded when the store's knowledge stamp (a token the database
changes with every document added or deleted) moves. A query that names an API (`os.path.join`)
has the name searched whole as a BM25 phrase, BM25 weighted up in the fusion and a bonus for chunks
holding the name verbatim; then pages are ranked by their best chunks and each gives `per_page`
of them (a question is answered by a page); an optional trained reranker (rerank.py) may reorder
the best chunks first, and an optional trained query map (query_map.py) may map the question's
vector before the dense ranking; both are off by default (benchmarks/RESULTS.md, issue 17's
sections "Issue 17, what was left" and "The cross-encoder reranker, trained and measured", say why). benchmarks/retrieval.py measures it (`--manual python`: a whole manual).

`KnowledgeStage` runs this in the turn pipeline when the intent asks for knowledge and keeps
only passages whose cosine similarity to the question clears a threshold, so small talk does
not drag documents in. When a question that must be answered from the documents (an intent in
`grounded_intents`, e.g. knowledge_question for an assistant over a manual) finds nothing relevant, it hands respond an empty `Passages` frame, and
respond answers with a fixed sentence that says so (parley/pipeline/grounding.py). Passages are data: their text is returned verbatim, whatever it says.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from parley.config import ConfigError, parse_cli, setting
from parley.pipeline.embed import Embedder, EmbedderError, cosine_top, to_blob
from parley.pipeline.frames import Frame, Intent, Passage, Passages, UserText
from parley.pipeline.readers import DEFAULT_MAX_BYTES, MIME, Chunk, ReadError, read_chunks, reader_process_init, supported
from parley.pipeline.query_map import QueryMap
from parley.pipeline.rerank import Reranker
from parley.pipeline.runner import Stage, Turn
from parley.store import ChunkHit, Store, database_errors

Embed = Callable[[list[str]], np.ndarray]
MODES = ("hybrid", "bm25", "dense")


class KnowledgeError(ValueError):
    pass


@dataclass(frozen=True)
class KnowledgeConfig:
    chunk_words: int = 200  # most words in a chunk
    overlap_words: int = 40  # words each chunk repeats from the one before
    max_bytes: int = DEFAULT_MAX_BYTES  # larger files are refused
    k: int = 5  # passages a turn gets at most
    candidates: int = 30  # taken from each ranking before fusion
    rrf_k: int = 60  # reciprocal rank fusion constant
    min_similarity: float = 0.3  # cosine a passage needs to reach a turn
    dense_floor: float = 0.2  # cosine a chunk needs to count in the dense ranking at all
    identifier_weight: float = 2.0  # BM25's weight in the fusion when the query names an API (os.path.join)
    exact_bonus: float = 1.0  # fused score, in top-rank units, for a chunk holding a named API verbatim
    per_page: int = 1  # page ranking: pages by their best chunks, this many chunks from each (0: rank chunks)
    rerank: bool = False  # the stage reorders the best fused chunks with the trained reranker (rerank.py)
    rerank_top: int = 10  # how many of the best fused chunks the reranker reads (10 beat 20 on the tuning set)
    query_map: str = ""  # a trained query map (query_map.py) the dense ranking maps the question with ('' = none)
    intents: frozenset[str] = frozenset({"knowledge_question", "out_of_scope"})  # that retrieve
    # intents whose question must be answered from the documents: when nothing relevant is found
    # the stage hands respond an empty Passages frame, and respond says so instead of guessing.
    # Empty by default: the NLU's knowledge_question also covers general questions ("what is the
    # capital of France?") that the model answers from its own knowledge (tests/test_e2e.py);
    # an assistant over a manual sets {"knowledge_question"}.
    grounded_intents: frozenset[str] = frozenset()
    collection: str | None = None  # the stage searches this collection only (None: all)

    def __post_init__(self):
        if self.chunk_words < 20 or not 0 <= self.overlap_words <= self.chunk_words // 2:
            raise KnowledgeError(f"need chunk_words >= 20 and an overlap of at most half of it: {self}")
        if self.k < 1 or self.candidates < self.k or self.rrf_k < 0 or self.max_bytes < 1:
            raise KnowledgeError(f"need k >= 1, candidates >= k, rrf_k >= 0 and max_bytes >= 1: {self}")
        if self.identifier_weight < 0 or self.exact_bonus < 0 or self.per_page < 0 or self.rerank_top < 1:
            raise KnowledgeError(f"identifier_weight, exact_bonus and per_page cannot be negative, "
                                 f"and rerank_top must be at least 1: {self}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise KnowledgeError(f"min_similarity is a cosine, between -1 and 1, not {self.min_similarity}")


# --- ingestion ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestResult:
    path: Path
    name: str  # the document's name: the file name, or its path inside an ingested folder
    status: str  # "stored" | "skipped" | "error"
    chunks: int = 0
    document_id: int | None = None
    message: str = ""  # why it was skipped, what went wrong, or that it replaced a version

    def __str__(self) -> str:
        """The line `parley ingest` prints."""
        if self.status == "error":
            return f"{self.name}: error: {self.message}"
        what = f"stored {self.chunks} chunk{'s' * (self.chunks != 1)}" if self.status == "stored" else "skipped"
        return f"{self.name}: {what}" + (f" ({self.message})" if self.message else "")


def ingest(
    store: Store,
    embedder: Embed,
    user_id: int,
    paths: list[Path],
    collection: str = "default",
    *,
    config: KnowledgeConfig = KnowledgeConfig(),
    progress: Callable[[IngestResult], None] | None = None,
    source: str | None = None,
    batch_chunks: int = 512,
) -> list[IngestResult]:
    """Add files (folders are walked for supported files) to one of the user's collections;
    the results come back in the order of the files. A file that cannot be read is an "error"
    result and the others go on; a missing path, an unknown user or an empty collection name
    raise `KnowledgeError` before anything is done. `source`, for one file, is what the document
    records as where it came from instead of the file's path (an upload: its name, never the
    server's temporary folder); a later file with the same source replaces it.

    A reader (a process for a folder, a thread for a few files: `_Reader`) reads and chunks the
    next files while the encoder runs, the encoder taking one core fewer while the reader works
    (looked at every 64 chunks: `_embed_beside`); the chunks of several files are embedded together, in
    length-sorted batches, once `batch_chunks` of them wait, and each file is then stored in a
    transaction of its own. A run that is killed leaves every file whole or absent, and
    running it again skips what was stored (same sha256) and finishes the rest. `progress` is
    called with each file's result as it is decided."""
    if store.get_user(user_id) is None:
        raise KnowledgeError(f"unknown user {user_id}")
    if not isinstance(collection, str) or not collection.strip():
        raise KnowledgeError("the collection name must be a non-empty string")
    if batch_chunks < 1:
        raise KnowledgeError(f"batch_chunks must be at least 1, not {batch_chunks}")
    files = list(_files([Path(p) for p in paths]))
    if source is not None and len(files) != 1:
        raise KnowledgeError(f"a source name is for one file, not {len(files)}")
    existing = store.list_documents(user_id, collection)
    known = {d.sha256: d.name for d in existing}  # grows as this run stores files
    older = {d.source: d.id for d in existing}
    results: list[IngestResult | None] = [None] * len(files)
    waiting: list[tuple[int, _Read]] = []

    def done(i: int, result: IngestResult) -> None:
        results[i] = result
        if progress:
            progress(result)

    def flush() -> None:
        texts = [c.text for _, read in waiting for c in read.chunks]
        vectors = _embed_beside(embedder, texts, reader.busy)
        ends = np.cumsum([len(read.chunks) for _, read in waiting])
        for (i, read), end in zip(waiting, ends):
            mine = vectors[end - len(read.chunks) : end]
            if read.digest in known:  # the same bytes twice in this run
                done(i, _unchanged(read.path, read.name, known[read.digest], collection))
                continue
            where = source or str(read.path.resolve())
            replaces = older.get(where)
            doc_id = store.add_document(
                user_id, read.name, read.mime, [c.text for c in read.chunks], collection=collection, source=where,
                sha256=read.digest, pages=[c.page for c in read.chunks],
                embeddings=[to_blob(v) for v in mine], replaces=replaces,
            )
            known[read.digest] = read.name
            done(i, IngestResult(read.path, read.name, "stored", len(read.chunks), doc_id,
                                 "replaced its earlier version" if replaces else ""))
        waiting.clear()

    reader = _Reader(files, config, known, collection)
    for i, read in enumerate(reader):
        if isinstance(read, IngestResult):
            done(i, read)
            continue
        waiting.append((i, read))
        if sum(len(r.chunks) for _, r in waiting) >= batch_chunks:
            flush()
    flush()
    return results  # type: ignore[return-value]  (every slot is filled)


def _files(paths: list[Path]) -> Iterator[tuple[Path, str]]:
    if not paths:
        raise KnowledgeError("no files to ingest: give at least one file or folder")
    for path in paths:
        if not path.exists():
            raise KnowledgeError(f"no such file or folder: {path}")
    for path in paths:
        if not path.is_dir():
            yield path, path.name
            continue
        for file in sorted(path.rglob("*")):
            inside = file.relative_to(path)
            if file.is_file() and supported(file) and not any(part.startswith(".") for part in inside.parts):
                yield file, inside.as_posix()


@dataclass(frozen=True)
class _Read:
    """A file read and chunked, waiting to be embedded and stored."""

    path: Path
    name: str
    digest: str
    mime: str
    chunks: list[Chunk]


def _unchanged(path: Path, name: str, same: str, collection: str) -> IngestResult:
    return IngestResult(path, name, "skipped",
                        message=f"unchanged: the same content as {same} in collection {collection!r}")


class _Reader:
    """Each file's chunks (or its result: unchanged, unreadable), in order, computed ahead of
    the encoder: by a thread for a few files, and for a folder by a process of its own
    (reading HTML is Python: on a thread it holds the interpreter the encoder needs between
    operations). Up to `ahead` files, and
    `ahead_bytes` of them on disk, are read before the encoder takes them; while the reader
    works, `busy()` is true, and `ingest` gives the encoder one core fewer (`_embed_beside`)."""

    PROCESS_FROM = 16  # files: fewer are read on a thread (a process takes ~0.5 s to start)

    def __init__(self, files: list[tuple[Path, str]], config: KnowledgeConfig, known: dict[str, str],
                 collection: str, ahead: int = 256, ahead_bytes: int = 128 << 20):
        self.files, self.config, self.known, self.collection = files, config, known, collection
        self.ahead, self.ahead_bytes = ahead, ahead_bytes
        if len(files) >= self.PROCESS_FROM:
            self.pool: Executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=reader_process_init, initargs=(os.getpid(),))
        else:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="parley-read")
        self.pending: deque[tuple[Future, int]] = deque()
        self.submitted = 0
        self.skip = frozenset(known)  # stored before this run: not parsed again

    def __iter__(self) -> Iterator[_Read | IngestResult]:
        try:
            for path, name in self.files:
                self._fill()
                future, _ = self.pending.popleft()
                yield self._result(path, name, future)
                self._fill()
        finally:  # also when ingest stops early: the files read ahead are not waited for
            self.pool.shutdown(cancel_futures=True)

    def busy(self) -> bool:
        return any(not future.done() for future, _ in self.pending)

    def _fill(self) -> None:
        held = sum(size for _, size in self.pending)
        while self.submitted < len(self.files) and (not self.pending or (
                len(self.pending) < self.ahead and held < self.ahead_bytes)):
            path, _ = self.files[self.submitted]
            try:
                size = path.stat().st_size
            except OSError:
                size = 0  # read_chunks says what is wrong
            c = self.config
            self.pending.append((self.pool.submit(read_chunks, path, c.max_bytes, c.chunk_words, c.overlap_words,
                                                  self.skip), size))
            self.submitted += 1
            held += size

    def _result(self, path: Path, name: str, future: Future) -> _Read | IngestResult:
        return _outcome(path, name, self.known, self.collection, future.result)


def _read_one(path: Path, name: str, config: KnowledgeConfig, known: dict[str, str],
              collection: str) -> _Read | IngestResult:
    """The file's chunks, or its result where there is nothing to embed: skipped (its bytes are
    in the collection already) or an error (it cannot be read). In this thread."""
    return _outcome(path, name, known, collection, lambda: read_chunks(
        path, config.max_bytes, config.chunk_words, config.overlap_words, frozenset(known)))


def _outcome(path: Path, name: str, known: dict[str, str], collection: str,
             read: Callable[[], tuple[str, str, list[Chunk] | None]]) -> _Read | IngestResult:
    try:
        digest, mime, chunks = read()
    except (ReadError, OSError) as e:
        return IngestResult(path, name, "error", message=str(e))
    if chunks is None or digest in known:  # stored before, or earlier in this run
        return _unchanged(path, name, known.get(digest, name), collection)
    return _Read(path, name, digest, mime, chunks)


def _embed_beside(embedder: Embed, texts: list[str], reading: Callable[[], bool], part: int = 64) -> np.ndarray:
    """`texts`' vectors, embedded `part` at a time (shortest first, so each part's batches are of
    like lengths) on one thread fewer while `reading()`: the reader has a core then, and the
    encoder's threads would wait on it. It reads only the files it was given before this call,
    so it is soon done and the rest runs on every thread."""
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    threads = torch.get_num_threads()
    out = None
    try:
        for start in range(0, len(order), part):
            rows = order[start : start + part]
            torch.set_num_threads(threads - 1 if threads > 1 and reading() else threads)
            vectors = _embed(embedder, [texts[i] for i in rows])
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
    finally:
        torch.set_num_threads(threads)
    return out


def _embed(embedder: Embed, texts: list[str]) -> np.ndarray:
    vectors = np.asarray(embedder(texts), dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(texts) or not np.isfinite(vectors).all():
        raise KnowledgeError(f"the embedder returned {vectors.shape} (or non-finite values) for {len(texts)} texts")
    return vectors


# --- retrieval ------------------------------------------------------------------------------


class VectorCache:
    """Each user's chunk vectors as one matrix, loaded once and reloaded when their documents
    change. One cache may serve many threads and `Store` connections to the same database."""

    def __init__(self):
        self._entries: dict[tuple[int, str | None], tuple[str | None, np.ndarray, np.ndarray]] = {}

    def get(self, store: Store, user_id: int, collection: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids ascending, their unit vectors as rows)."""
        stamp = store.knowledge_stamp(user_id)  # read before the vectors: a race only costs a reload
        entry = self._entries.get((user_id, collection))
        if entry is None or entry[0] != stamp:
            rows = store.chunk_embeddings(user_id, collection)
            sizes = {len(blob) for _, blob in rows}
            if len(sizes) > 1 or sizes & {0}:
                raise KnowledgeError("stored chunk vectors have different sizes; re-ingest the documents")
            ids = np.array([i for i, _ in rows], dtype=np.int64)
            dim = len(rows[0][1]) // 4 if rows else 0
            matrix = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(len(rows), dim)
            entry = self._entries[(user_id, collection)] = (stamp, ids, matrix)
        return entry[1], entry[2]


STOPWORDS = frozenset("""a about all also am an and any are as at be been but by can could did do does doing
for from had has have how i if in into is it its me my no not of on or our so some such than that the their
them then there these they this those to us was we were what when where which while who whom why will with
would you your""".split())


# A name from code: dotted (os.path.join), snake_case (default_factory, __slots__) or with a capital
# inside (ThreadPoolExecutor, maxBytes). Plain words ("deque") are left to BM25 as words.
IDENTIFIER = re.compile(r"(?<![\w.])(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|\w*[a-z0-9]_\w*|_\w+_|[A-Za-z][a-z0-9]+[A-Z]\w*)")


def identifiers(query: str) -> list[str]:
    """The code names a query mentions, in order, without repeats."""
    names = (m.group() for m in IDENTIFIER.finditer(query))
    return list(dict.fromkeys(n for n in names if min(len(part) for part in n.split(".")) > 1))  # not "e.g"


def keywords(query: str) -> str:
    """The query for BM25: each code name whole (searched as a phrase, so `os.path.join` outranks
    a chunk with "os", "path" and "join" far apart), then its words without the most common
    English ones, which match nearly every chunk and so would fill BM25's candidates with noise
    (unchanged if nothing else is left)."""
    words = re.findall(r"\w+", query)
    kept = [w for w in words if w.lower() not in STOPWORDS]
    names = [n for n in identifiers(query) if not re.fullmatch(r"\w+", n)]  # one-word names are words already
    return " ".join(names + kept) if kept or names else query


@dataclass(frozen=True)
class Candidate:
    """A chunk found for a query, with the evidence for its place."""

    chunk: ChunkHit
    fused: float  # reciprocal rank fusion score: higher is better
    cosine: float  # similarity of the chunk's vector to the query's
    bm25_rank: int | None  # 1-based rank in each list, None if not in it
    dense_rank: int | None
    page_score: float | None = None  # its page's score, when pages were ranked

    def passage(self, n: int) -> Passage:
        c = self.chunk
        where = f"chunk {c.ord + 1}" if c.page is None else f"page {c.page}, chunk {c.ord + 1}"
        return Passage(n, c.document_name, where, c.text, round(self.fused, 6), c.document_id, c.chunk_id)

    def evidence(self) -> dict:
        return {"chunk_id": self.chunk.chunk_id, "document": self.chunk.document_name, "fused": round(self.fused, 5),
                "cosine": round(self.cosine, 4), "bm25_rank": self.bm25_rank, "dense_rank": self.dense_rank,
                "page_score": None if self.page_score is None else round(self.page_score, 5)}


def search(
    store: Store,
    embedder: Embed,
    user_id: int,
    query: str,
    k: int = 5,
    *,
    collection: str | None = None,
    mode: str = "hybrid",
    cache: VectorCache | None = None,
    config: KnowledgeConfig = KnowledgeConfig(),
    reranker: Reranker | None = None,
    query_map: QueryMap | None = None,
) -> list[Candidate]:
    """The user's k best chunks for `query`, best first. `mode` "bm25" or "dense" uses one
    ranking alone (to measure what fusion adds). A `reranker` reorders the best
    `config.rerank_top` fused chunks; a `query_map` maps the question's vector before the dense
    ranking (the cosines reported stay unmapped). With `config.per_page`, documents are ranked by their
    chunks' scores (a question is answered by a page) and each gives its best `per_page`
    chunks, so k passages span several pages rather than repeating one."""
    if not isinstance(query, str) or not query.strip():
        raise KnowledgeError("the query must be a non-empty string")
    if mode not in MODES:
        raise KnowledgeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if k < 1:
        raise KnowledgeError(f"k must be at least 1, not {k}")
    ids, matrix = (cache or VectorCache()).get(store, user_id, collection)
    q = _embed(embedder, [query])[0]
    if len(ids) and matrix.shape[1] != len(q):
        raise KnowledgeError(f"stored vectors have {matrix.shape[1]} dimensions but the embedder gives {len(q)}: "
                             "re-ingest the documents with this embedder")
    n = max(config.candidates, k)
    lexical = store.search_chunks(user_id, keywords(query), n, collection) if mode != "dense" else []
    asked = q if query_map is None else query_map(q)
    dense = [(int(ids[row]), cos) for row, cos in cosine_top(asked, matrix, n) if cos >= config.dense_floor]
    dense = dense if mode != "bm25" else []
    bm25_rank = {hit.chunk_id: r for r, hit in enumerate(lexical, 1)}
    dense_rank = {chunk_id: r for r, (chunk_id, _) in enumerate(dense, 1)}
    chunks = {hit.chunk_id: hit for hit in lexical}
    chunks |= {hit.chunk_id: hit for hit in store.get_chunks(user_id, [i for i in dense_rank if i not in chunks])}
    fused = _fuse(query, bm25_rank, dense_rank, chunks, config)
    order = sorted(fused, key=lambda i: (-fused[i], i))
    score = fused
    if reranker is not None and order:
        top = order[: config.rerank_top]
        by_reranker = np.argsort(-reranker.score(query, [chunks[i].text for i in top]), kind="stable")
        order = [top[j] for j in by_reranker] + order[len(top):]
        score = {i: 1 / (config.rrf_k + r) for r, i in enumerate(order, 1)}  # the new order, on fusion's scale
    pages = _pages(order, score, chunks, config.per_page) if config.per_page else {}
    if pages:
        order = sorted(order, key=lambda i: -pages[chunks[i].document_id])  # stable: a page's best chunks first
        taken: Counter[int] = Counter()
        for i in list(order):
            taken[chunks[i].document_id] += 1
            if taken[chunks[i].document_id] > config.per_page:
                order.remove(i)
    best = order[:k]
    cosines = _cosines(embedder, q, [chunks[i] for i in best], ids, matrix)
    return [Candidate(chunks[i], fused[i], cos, bm25_rank.get(i), dense_rank.get(i),
                      pages.get(chunks[i].document_id)) for i, cos in zip(best, cosines)]


def _fuse(query: str, bm25_rank: dict[int, int], dense_rank: dict[int, int], chunks: dict[int, ChunkHit],
          config: KnowledgeConfig) -> dict[int, float]:
    """Weighted reciprocal rank fusion. A query that names an API (`asyncio.gather`) leans on
    BM25, which finds the name exactly, and a chunk that holds the name verbatim gets a bonus,
    so a page that only mentions the words in passing cannot push the page that defines it out."""
    names = [n for n in identifiers(query) if not re.fullmatch(r"[a-z]+", n)]
    weight = config.identifier_weight if names else 1.0
    fused = {i: sum(w / (config.rrf_k + r[i]) for r, w in ((bm25_rank, weight), (dense_rank, 1.0)) if i in r)
             for i in bm25_rank | dense_rank}
    if names and config.exact_bonus:
        bonus = config.exact_bonus / (config.rrf_k + 1)
        for i in fused:
            text = chunks[i].text
            fused[i] += bonus * sum(n in text for n in names) / len(names)
    return fused


def _pages(order: list[int], fused: dict[int, float], chunks: dict[int, ChunkHit], per_page: int) -> dict[int, float]:
    """Each document's score: its best chunk's fused score plus half its second's and a quarter
    of its third's, so a page that answers in several places beats one lucky chunk, but a long
    page is not rewarded for length alone."""
    seen: dict[int, list[float]] = {}
    for i in order:  # best first
        seen.setdefault(chunks[i].document_id, []).append(fused[i])
    return {doc: sum(s * 0.5**j for j, s in enumerate(scores[:3])) for doc, scores in seen.items()}


def _cosines(embedder: Embed, q: np.ndarray, hits: list[ChunkHit], ids: np.ndarray, matrix: np.ndarray) -> list[float]:
    """Cosine of each hit to the query: from the stored vector, or embedded now if it has none
    (a document stored without vectors)."""
    rows = np.searchsorted(ids, [h.chunk_id for h in hits]).clip(max=max(len(ids) - 1, 0))
    stored = [len(ids) > 0 and ids[r] == h.chunk_id for h, r in zip(hits, rows)]
    missing = [h.text for h, s in zip(hits, stored) if not s]
    fresh = iter(_embed(embedder, missing) @ q if missing else [])
    return [float(matrix[r] @ q) if s else float(next(fresh)) for r, s in zip(rows, stored)]


def retrieve(store: Store, embedder: Embed, user_id: int, query: str, k: int = 5, *,
             collection: str | None = None, cache: VectorCache | None = None,
             config: KnowledgeConfig = KnowledgeConfig()) -> list[Passage]:
    """The user's k best passages for `query` by hybrid search, numbered 1..k for citation:
    fewer (or none) when fewer chunks match a keyword or come near the query's meaning."""
    hits = search(store, embedder, user_id, query, k, collection=collection, cache=cache, config=config)
    return [c.passage(n) for n, c in enumerate(hits, 1)]


def format_citations(passages: list[Passage] | tuple[Passage, ...]) -> str:
    """One line per passage: "[1] notes.txt, chunk 3"."""
    return "\n".join(f"[{p.n}] {p.source}, {p.location}" for p in passages)


# --- the pipeline stage ---------------------------------------------------------------------


class KnowledgeStage(Stage):
    """On a user's text whose intent asks for knowledge, add a `Passages` frame of the relevant
    passages from the user's documents (before passing the text on, so that respond, which
    answers the text, finds them). The documents are read from the turn's store; the vector
    cache is shared by every turn and thread (see `VectorCache`)."""

    name = "knowledge"

    def __init__(self, embedder: Embed, config: KnowledgeConfig = KnowledgeConfig()):
        self.embedder, self.config = embedder, config
        self.cache = VectorCache()
        self.reranker = None
        if config.rerank:
            if not isinstance(embedder, Embedder):
                raise KnowledgeError("rerank needs the MiniLM Embedder, whose encoder the reranker reads with")
            self.reranker = Reranker.load(embedder)
        self.query_map = QueryMap.load(config.query_map) if config.query_map else None

    def process(self, frame: Frame, turn: Turn) -> Iterator[Frame]:
        if isinstance(frame, UserText):
            found = self._passages(frame.text, turn)
            if found is not None:
                yield found
        yield frame

    def _passages(self, text: str, turn: Turn) -> Passages | None:
        intent = turn.get(Intent)  # no NLU stage in the pipeline: always look
        if intent is not None and intent.name not in self.config.intents:
            turn.note(self.name, f"skipped for intent {intent.name}", intent=intent.name)
            return None
        if not text.strip():
            turn.note(self.name, "skipped: empty text")
            return None
        cfg, store = self.config, turn.store
        if store is None:
            raise ValueError("the knowledge stage reads the user's documents from the store: give the Turn a store")
        try:
            if not store.list_documents(turn.user_id, cfg.collection):
                turn.note(self.name, "no documents", intent=intent and intent.name)
                return None
            found = search(store, self.embedder, turn.user_id, text, cfg.k, collection=cfg.collection,
                           cache=self.cache, config=cfg, reranker=self.reranker, query_map=self.query_map)
        except KnowledgeError as e:
            turn.note(self.name, f"error: {e}")
            return None
        relevant = [c for c in found if c.cosine >= cfg.min_similarity]
        evidence = {"intent": intent and intent.name, "min_similarity": cfg.min_similarity,
                    "candidates": [c.evidence() for c in found]}
        if not relevant:
            turn.note(self.name, "nothing relevant", **evidence)
            grounded = intent is not None and intent.name in cfg.grounded_intents
            return Passages((), origin="knowledge") if grounded else None
        turn.note(self.name, f"retrieved {len(relevant)}", **evidence)
        return Passages(tuple(c.passage(n) for n, c in enumerate(relevant, 1)), origin="knowledge")


# --- `parley ingest` ------------------------------------------------------------------------


@dataclass
class IngestConfig:
    paths: list[Path] = setting(help="files, or folders to walk (.txt .md .html .pdf)", positional="PATH")
    user: str = setting("local", "whose knowledge base (created if new)")
    collection: str = setting("default", "collection to add to")
    db: str = setting("", "SQLite file or postgresql:// URL ('' = PARLEY_HOME/parley.db)")
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "auto", "the encoder's arithmetic: auto = bf16 where the CPU has AMX or AVX512-BF16, else fp32")
    batch_chunks: int = setting(512, "chunks (of several files) embedded together before they are stored")
    progress: Literal["auto", "on", "off"] = setting(
        "auto", "a chunks-per-second line on stderr: auto = when stderr is a terminal")

    def __post_init__(self):
        if not self.paths:
            raise ValueError("give at least one file or folder: parley ingest PATH...")
        if self.batch_chunks < 1:
            raise ValueError(f"batch_chunks must be at least 1, not {self.batch_chunks}")


class ProgressLine:
    """`parley ingest`'s report: each file's line on stdout and, where wanted, one status line on
    stderr rewritten in place: "12/496 files, 1,410 chunks, 84.2 chunks/s, 17 s"."""

    def __init__(self, total: int, show: bool, out=None, err=None):
        self.total, self.show = total, show
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.files = self.chunks = 0
        self.start = time.perf_counter()

    def __call__(self, result: IngestResult) -> None:
        self.files += 1
        self.chunks += result.chunks
        if self.show:
            self.err.write("\r\x1b[K")  # clear the status line before a file's line goes above it
            self.err.flush()
        print(result, file=self.out, flush=True)
        if self.show:
            self.err.write(self.status() + ("\n" if self.files == self.total else ""))
            self.err.flush()

    def status(self) -> str:
        seconds = time.perf_counter() - self.start
        return (f"{self.files}/{self.total} files, {self.chunks:,} chunks, "
                f"{self.chunks / max(seconds, 1e-9):.1f} chunks/s, {seconds:.0f} s")


def ingest_main(argv: list[str]) -> int:
    """`parley ingest PATH... [--user NAME] [--collection NAME] [--db PATH] [--precision auto|fp32|bf16]
    [--progress auto|on|off]`; `--help` lists the keys. Killed midway, the same command again
    skips the files already stored and finishes the rest."""
    try:
        args = parse_cli(IngestConfig, argv, prog="parley ingest")
    except ConfigError as e:
        print(f"parley: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        missing = [p for p in args.paths if not p.exists()]
        if missing:
            raise KnowledgeError(f"no such file or folder: {missing[0]}")
        from parley.registry import store_target

        db = store_target(args.db or None)
        with Store(db) as store:
            user = store.get_user_by_name(args.user) or store.add_user(args.user)
            # batches of many chunks: oneDNN's bf16 throughout beats kernels.c's bf16 products
            # there (embed.py's docstring; benchmarks/probes/encoder_paths.py --batch 32)
            embedder = Embedder.load(precision=args.precision, path="torch")
            show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
            report = ProgressLine(len(list(_files(args.paths))), show)
            results = ingest(store, embedder, user.id, args.paths, args.collection, progress=report,
                             batch_chunks=args.batch_chunks)
    except (ValueError, OSError, EmbedderError, *database_errors()) as e:
        print(f"parley: error: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"parley: error: no supported files ({' '.join(sorted(MIME))}) in {' '.join(map(str, args.paths))}",
              file=sys.stderr)
        return 2
    stored = [r for r in results if r.status == "stored"]
    errors = [r for r in results if r.status == "error"]
    seconds = time.perf_counter() - start
    chunks = sum(r.chunks for r in stored)
    print(f"{len(results)} files in {seconds:.1f} s: {len(stored)} stored ({chunks} chunks), "
          f"{len(results) - len(stored) - len(errors)} unchanged, {len(errors)} failed; user {args.user!r}, "
          f"collection {args.collection!r}, database {db}; {chunks / seconds:.1f} chunks/s, "
          f"{embedder.precision} encoder")
    if errors:
        print(f"parley: error: {len(errors)} of {len(results)} files could not be ingested (see above)",
              file=sys.stderr)
        return 2
    return 0
