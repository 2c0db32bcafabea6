"""Query rewriting by the language model (issue 17): before the search, the model writes a short
passage in the manual's own words that would answer the question (HyDE: "hypothetical document
embeddings"), and the search reads the question followed by that passage.

    rewrite = QueryRewriter(engine, tokenizer)
    searched = rewrite(["how do I stop a thread?"])[0]    # "how do I stop a thread? Use threading.Event ..."

The passage may be wrong (a 135M model often is): it only steers which chunks are found, and the
answer is still written from the chunks themselves. The question stays in front so that its
exact names still reach BM25. Off by default: benchmarks/RESULTS.md has the measurement that
decided it.
"""

from __future__ import annotations

from parley.engine.sampling import SamplingParams

ASK = ("You write documentation. Answer the user's question with a short passage as it would appear "
       "in the Python documentation, naming the modules, functions and terms it would use.")


class QueryRewriter:
    """Questions -> what to search for: each question and a passage the model wrote for it."""

    def __init__(self, engine, tokenizer, max_tokens: int = 48, system: str = ASK):
        self.engine, self.tokenizer, self.system = engine, tokenizer, system
        self.params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_ids=tokenizer.stop_ids)

    def __call__(self, questions: list[str], batch: int = 16) -> list[str]:
        out = []
        for start in range(0, len(questions), batch):
            part = questions[start : start + batch]
            prompts = [self.tokenizer.encode_chat([{"role": "system", "content": self.system},
                                                   {"role": "user", "content": q}]) for q in part]
            for q, done in zip(part, self.engine.generate(prompts, self.params)):
                passage = " ".join(self.tokenizer.decode(done.tokens).split())
                out.append(f"{q} {passage}".strip())
        return out
