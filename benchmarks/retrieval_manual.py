"""A whole manual in a store, kept on disk between runs: the Python 3.11 docs for benchmarks/retrieval.py.

    pages = manual_pages(DOCS)                 # every HTML page but the generated indexes
    seconds, chunks = ingest_manual(db, DOCS)  # ingested once; a second call reuses the file

Documents are named by their path inside the docs folder ("library/os.path.html"), as a
question's pages are, because several pages share a file name (index.html).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from parley.pipeline.embed import Embedder
from parley.pipeline.knowledge import KnowledgeConfig, ingest
from parley.store import Store

SKIP = ("genindex", "search.html", "py-modindex.html")  # generated indexes: lists of every name, no prose


def manual_pages(docs: Path) -> list[str]:
    """The pages a user pointing Parley at the docs folder would want, as paths inside it."""
    if not (docs / "library" / "functions.html").is_file():
        sys.exit(f"error: no Python docs at {docs}: install them with `apt-get install -y python3.11-doc`")
    pages = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.html"))
    return [p for p in pages if not p.startswith(SKIP) and not p.startswith("_")]


def ingest_manual(db: Path, docs: Path, user: str = "bench", config: KnowledgeConfig = KnowledgeConfig(),
                  log=print) -> tuple[float, int]:
    """(seconds, chunks) of ingesting the manual into `db` as `user`; (0.0, chunks) when `db`
    already holds it. The pages are linked into a temporary tree so documents keep their paths."""
    pages = manual_pages(docs)
    with Store(db) as store:
        uid = (store.get_user_by_name(user) or store.add_user(user)).id
        have = {d.name for d in store.list_documents(uid)}
        if set(pages) <= have:
            return 0.0, store.db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        with tempfile.TemporaryDirectory() as tmp:
            for page in pages:
                link = Path(tmp) / page
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(docs / page)
            embedder = Embedder.load()
            start = time.perf_counter()
            results = ingest(store, embedder, uid, [Path(tmp)], config=config, progress=lambda r: log(r))
            seconds = time.perf_counter() - start
        errors = [r for r in results if r.status == "error"]
        if errors:
            sys.exit(f"error: {errors[0]}")
        return seconds, sum(r.chunks for r in results)
