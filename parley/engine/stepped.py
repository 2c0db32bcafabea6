"""`Engine.stream` over the continuous-batching scheduler, stepped in the caller's thread.

    engine = SteppedEngine(model)                       # what `parley chat` generates with
    for event in engine.stream([prompt_ids], SamplingParams(max_tokens=64)):
        print(event.token, event.finish_reason)

For one user in one process (the local assistant): each turn's prompt reuses the pages the
conversation so far left in the paged cache (the persona, the principles, the history), so
a turn prefills only what is new, and prompts go through the C prompt layers (engine/fast.py)
instead of the PyTorch forward. No background thread: the steps run in the thread that
iterates, so all of the model's OpenMP work stays on one thread (two teams on a small
machine slow both). Stopping the iteration cancels the requests and frees their pages.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from parley.engine.engine import Engine, Event, params_per_prompt
from parley.engine.sampling import SamplingParams
from parley.engine.scheduler import RequestHandle, Scheduler
from parley.model.transformer import Transformer


class SteppedEngine:
    """Looks like `Engine` to code that calls `stream`, `generate`, `check_prompt` and
    `context_length`. `scheduler_args` go to `Scheduler` (default: room for 8 rows)."""

    def __init__(self, model: Transformer, **scheduler_args):
        self.model = model
        self.scheduler = Scheduler(model, **{"max_batch": 8, **scheduler_args})
        self.fast = self.scheduler.fast

    @property
    def context_length(self) -> int:
        return self.scheduler.engine.context_length

    def check_prompt(self, prompt: Sequence[int]) -> None:
        self.scheduler.engine.check_prompt(prompt)

    def stats(self) -> dict:
        return self.scheduler.stats()

    def stream(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams]) -> Iterator[Event]:
        """The prompts' tokens as they are chosen, Event.index the prompt's position."""
        params = params_per_prompt(prompts, params)
        handles: list[RequestHandle] = []
        try:
            for prompt, p in zip(prompts, params):  # PromptError for a prompt that cannot be served
                handles.append(self.scheduler.submit(prompt, p))
            pending = set(range(len(handles)))
            while pending:
                self.scheduler.step()
                for i in sorted(pending):
                    for event in handles[i].delivered():
                        yield Event(i, event.token, event.finish_reason)
                    if handles[i].done:
                        pending.discard(i)
        finally:  # the caller stopped listening, or a step failed: free the pages now, computing nothing
            for handle in handles:
                if not handle.done:
                    handle.cancel()
            self.scheduler.drop_cancelled()

    generate = Engine.generate  # the tokens of each prompt, collected from stream
