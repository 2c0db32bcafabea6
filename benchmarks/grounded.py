"""End to end on a whole manual: questions whose short answer is a fact in the Python 3.11 docs,
answered by Parley's pipeline (knowledge stage + respond stage with a local model) and scored.

    python benchmarks/ingest.py --db docs.db                  # ingest the docs once (minutes)
    python benchmarks/grounded.py --db docs.db                # every question, SmolLM2
    python benchmarks/grounded.py --db docs.db --limit 10     # the first 10 questions: a quick run
    python benchmarks/grounded.py --models smollm2,gemma3-270m --db docs.db
    python benchmarks/grounded.py --db docs.db --no-cite      # the model's own citations only

gemma3-270m is a base (completion) model with no chat template: it is asked by a completion
prompt (`CompletionBackend`: the passages, an instruction, one worked example, "Question: ...
Answer:"), and its answer ends at the first line break. Models whose registry entry has a chat
template are asked as `parley chat` asks them. The respond stage adds [n] after each sentence a
passage supports (grounding.Citer) unless --no-cite; the report counts both the model's own
citations and the ones added.

Without --db the pages the questions name are ingested into a temporary store first (a small
knowledge base: say so when quoting its figures). The questions (benchmarks/data/
python_docs_answers.yml) are frozen. Per question and model it records:
- fact: the answer contains one of the accepted answers (case-insensitive, as a whole word);
- cited: the answer cites [n] where passage n comes from the page that states the fact or
  holds the fact in its text;
- grounded: both; retrieved: a passage given to the model came from that page or held the fact;
- the respond trace's citation verdict (parley/pipeline/grounding.py) and whether the fixed
  "nothing found" answer was given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parley.pipeline.frames import Intent, TextDelta, UserText  # noqa: E402
from parley.pipeline.runner import Pipeline, Stage, Turn  # noqa: E402

QUESTIONS = Path(__file__).parent / "data" / "python_docs_answers.yml"
DOCS = Path("/usr/share/doc/python3.11/html")
COLLECTION = "python-docs"


EXAMPLE = ("<<<passage 1 source=\"example.html\">>>\nThe spam module's eggs() function returns 12 by default."
           "\n<<<end passage 1>>>\n\nQuestion: What does spam.eggs() return by default?\n"
           "Answer: spam.eggs() returns 12 by default [1].\n\n")
INSTRUCTION = ("Answer each question in one sentence from the numbered passages, and cite the passage "
               "you used as [n].\n\n")


class CompletionBackend:
    """A completion model asked with plain text: the instruction, one worked example, then the
    turn's user message (the fenced passages and "Question: ...") and "Answer:". The answer ends
    at the first line break. It implements respond.Backend over a LocalBackend's engine."""

    def __init__(self, local):
        self.local, self.tokenizer = local, local.tokenizer
        breaks = {i for text in ("\n", "\n\n") for i in self.tokenizer.encode(text)}
        self.params = dataclasses.replace(local.params, stop_ids=local.params.stop_ids | breaks)
        self.context_length, self.answer_room = local.context_length, local.answer_room

    @staticmethod
    def render(messages: list[dict]) -> str:
        return INSTRUCTION + EXAMPLE + messages[-1]["content"].strip() + "\nAnswer:"

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer.encode(self.render(messages)))

    def stream(self, messages, overrides=None, cancel=None, usage=None):
        from parley.engine.text import TextAssembler

        ids = self.tokenizer.encode(self.render(messages))
        text = TextAssembler(self.tokenizer)
        request = self.local.engine.submit(ids, self.params)
        try:
            for event in request:
                if piece := text.push(event):
                    yield piece
                if text.finish_reason:
                    break
        finally:
            request.cancel()


class AskedForKnowledge(Stage):
    """Stands in for the NLU stage: every question here asks for the documents."""

    name = "nlu"

    def process(self, frame, turn):
        if isinstance(frame, UserText):
            yield Intent("knowledge_question", 1.0)
        yield frame


def has_fact(text: str, answers: list[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(a)}(?![\w])", text, re.IGNORECASE) for a in answers)


def holds(passage, item: dict) -> bool:
    """The passage comes from the page that states the fact, or contains the fact."""
    return Path(passage.source).name == Path(item["page"]).name or has_fact(passage.text, item["answers"])


def score(item: dict, answer: str, turn: Turn) -> dict:
    passages = {p.n: p for p in turn.sources()}
    cited = {int(n) for n in re.findall(r"\[(\d{1,3})\]", answer)}
    respond = turn.trace.get("respond")
    evidence = respond.evidence if respond else {}
    added = {c["n"] for c in evidence.get("citations_added", [])}
    own = {c["n"] for c in evidence.get("citations", [])} - added if evidence.get("citations") else set()
    fact = has_fact(answer, item["answers"])
    cites = any(n in passages and holds(passages[n], item) for n in cited)
    return {"id": item["id"], "fact": fact, "cited": cites, "grounded": fact and cites,
            "own_citation": bool(own), "citation_added": bool(added),
            "retrieved": any(holds(p, item) for p in passages.values()), "citations": sorted(cited),
            "verdict": evidence.get("grounding"), "answer": answer.strip()[:300]}


def knowledge_base(args, embedder):
    """(store, user id): the --db store, or a temporary one with the pages the questions name."""
    from parley.pipeline.knowledge import ingest
    from parley.store import Store

    if args.db:
        if not args.db.exists():
            sys.exit(f"no store at {args.db}: run benchmarks/ingest.py --db {args.db} first")
        store = Store(args.db)
        user = store.get_user_by_name("bench")
        if user is None or not store.list_documents(user.id, COLLECTION):
            sys.exit(f"{args.db} holds no {COLLECTION!r} collection of user 'bench': fill it with benchmarks/ingest.py")
        return store, user.id
    items = yaml.safe_load(QUESTIONS.read_text())["questions"]
    pages = sorted({DOCS / q["page"] for q in items})
    store = Store(Path(tempfile.mkdtemp()) / "docs.db")
    user = store.add_user("bench").id
    ingest(store, embedder, user, pages, COLLECTION)
    return store, user


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, help="a store filled by benchmarks/ingest.py --db (default: the named pages only)")
    ap.add_argument("--models", default="smollm2", help="registered models, comma-separated")
    ap.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    ap.add_argument("--k", type=int, default=3, help="passages per question")
    ap.add_argument("--max-tokens", type=int, default=48, help="longest answer")
    ap.add_argument("--no-cite", action="store_true", help="leave the answers' citations as the model wrote them")
    ap.add_argument("--out", type=Path, help="write every answer and score here (JSON)")
    args = ap.parse_args()

    import torch

    from parley.engine.config import EngineConfig
    from parley.engine.engine import Engine
    from parley.engine.sampling import SamplingParams
    from parley.pipeline.embed import Embedder
    from parley.pipeline.knowledge import KnowledgeConfig, KnowledgeStage
    from parley.pipeline.respond import LocalBackend, RespondStage
    from parley.registry import Registry

    torch.set_flush_denormal(True)
    items = yaml.safe_load(QUESTIONS.read_text())["questions"]
    items = items[: args.limit] if args.limit else items
    embedder = Embedder.load()
    store, user = knowledge_base(args, embedder)
    knowledge = KnowledgeStage(embedder, KnowledgeConfig(k=args.k, collection=COLLECTION,
                                                           grounded_intents=frozenset({"knowledge_question"})))
    report = {}
    for name in args.models.split(","):
        engine_config = EngineConfig()  # what `parley chat` generates with (bf16 by default)
        model, tokenizer, _ = Registry().load(name, dtype=getattr(torch, engine_config.dtype))
        engine = Engine.from_config(model, engine_config)
        backend = LocalBackend(engine, tokenizer, SamplingParams(max_tokens=args.max_tokens, temperature=0))
        if tokenizer.chat_template is None:  # a base model: a completion prompt
            backend = CompletionBackend(backend)
        pipeline = Pipeline([AskedForKnowledge(), knowledge, RespondStage(backend, cite=not args.no_cite)])
        rows, start = [], time.perf_counter()
        for item in items:
            asked = time.perf_counter()
            turn = Turn(user_id=user, store=store)
            frames = list(pipeline.run(turn, UserText(item["question"])))
            rows.append(score(item, "".join(f.text for f in frames if isinstance(f, TextDelta)), turn))
            r = rows[-1]
            print(f"{name} q{r['id']} ({time.perf_counter() - asked:.0f} s): fact={r['fact']:d} cited={r['cited']:d} "
                  f"retrieved={r['retrieved']:d} "
                  f"verdict={r['verdict']} | {r['answer'][:100]!r}", flush=True)
        n = len(rows)
        summary = {k: sum(r[k] for r in rows) / n for k in ("fact", "cited", "grounded", "retrieved", "own_citation",
                                                            "citation_added")}
        summary["verdicts"] = {v: sum(r["verdict"] == v for r in rows) for v in sorted({str(r["verdict"]) for r in rows})}
        report[name] = {"questions": n, "seconds": round(time.perf_counter() - start, 1), **summary, "rows": rows}
        print(f"{name}: {n} questions, fact {summary['fact']:.2f}, cited {summary['cited']:.2f}, "
              f"fact+citation {summary['grounded']:.2f}, page retrieved {summary['retrieved']:.2f}, "
              f"own citation {summary['own_citation']:.2f}, citation added {summary['citation_added']:.2f}; "
              f"verdicts {summary['verdicts']}", flush=True)
    store.close()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
