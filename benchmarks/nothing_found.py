"""Can a score tell a general question from a question the documents cannot answer? (issue 17)

    python benchmarks/nothing_found.py --db /tmp/python-docs.db      # a store filled by benchmarks/retrieval.py --manual python

`KnowledgeConfig.grounded_intents` makes the assistant say "I found nothing about that in your
documents" instead of answering, when no passage reaches `min_similarity`. On by intent it broke
"What is the capital of France?" (tests/test_e2e.py): the NLU puts general questions in
knowledge_question too. This prints, for three kinds of question, the cosine of the nearest chunk
of the whole manual: general questions (to be answered by the model), questions about
neighbouring subjects that the manual does not answer (other libraries), and the tuning set's
questions, which the manual answers. A threshold could replace the intent only if the kinds
fall apart.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from parley.pipeline.embed import Embedder, cosine_top
from parley.pipeline.knowledge import KnowledgeConfig, VectorCache
from parley.store import Store

GENERAL = ["What is the capital of France?", "Who wrote Hamlet?", "What is the boiling point of water?",
           "Tell me a joke", "How tall is Mount Everest?", "Who painted the Mona Lisa?", "What is the speed of light?",
           "How many legs does a spider have?", "What's the weather like today?",
           "Who was the first president of the United States?", "What is photosynthesis?", "Recommend a good book",
           "How do I bake bread?", "What is the largest ocean?"]
NEIGHBOURS = ["How do I configure the Rust borrow checker?", "What is the default port of the pip cache server?",
              "How do I install Python on a Commodore 64?", "Which Java class replaces the Python GIL?",
              "How do I write a Django model?", "How do I plot a histogram with matplotlib?",
              "What does numpy.einsum do?", "How do I train a neural network in PyTorch?"]
TUNING = Path(__file__).parent / "data" / "python_docs_tuning.yml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, required=True, help="a store holding the manual (user 'bench')")
    args = ap.parse_args()
    if not args.db.exists():
        raise SystemExit(f"error: no store at {args.db}: run benchmarks/retrieval.py --manual python --db {args.db}")
    embedder = Embedder.load()
    tuning = [q["q"] for q in yaml.safe_load(TUNING.read_text())["questions"]]
    floor = KnowledgeConfig().min_similarity
    with Store(args.db) as store:
        user = store.get_user_by_name("bench")
        if user is None:
            raise SystemExit(f"error: {args.db} has no user 'bench'")
        _, matrix = VectorCache().get(store, user.id)
        for name, questions in (("general", GENERAL), ("neighbouring subjects", NEIGHBOURS), ("tuning set", tuning)):
            best = sorted(cosine_top(embedder([q])[0], matrix, 1)[0][1] for q in questions)
            below = sum(b < floor for b in best)
            print(f"{name:22} {len(best):3} questions: nearest chunk's cosine min {best[0]:.2f}, median "
                  f"{statistics.median(best):.2f}, max {best[-1]:.2f}; below min_similarity {floor}: {below}")


if __name__ == "__main__":
    main()
