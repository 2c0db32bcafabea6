"""`parley chat`: talk to a model in the terminal, or script it through a pipe.

    parley chat                              # default model, interactive
    printf 'Hi!\\nWhat is 2+2?\\n' | parley chat --temperature 0   # one user turn per line

Interactive sessions show a prompt and stream the answer token by token; with piped
input each answer is printed on its own line(s), followed by a blank line. The history
is kept; when it no longer fits the context, the oldest turns are dropped.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TextIO

from parley.engine.engine import Engine, PromptError
from parley.engine.sampling import SamplingParams
from parley.engine.text import TextStream
from parley.model.tokenizer import Tokenizer

HELP = """commands:
  /reset   forget the conversation so far
  /help    show this help
  /exit    leave (Ctrl-D works too)"""


class ChatSession:
    """A conversation: history of messages, rendered with the model's chat template."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, params: SamplingParams, system: str | None = None):
        self.engine, self.tokenizer = engine, tokenizer
        # answers end at the model's end-of-turn tokens as well as any the caller gave
        self.params = dataclasses.replace(params, stop_ids=params.stop_ids | tokenizer.stop_ids)
        self.system = system
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self, user_text: str) -> list[int]:
        """The rendered conversation, dropping the oldest exchanges until there is room
        for the answer (at least a quarter of the context, at most max_tokens)."""
        room = min(self.params.max_tokens, self.engine.context_length // 4)
        history = self.history + [{"role": "user", "content": user_text}]
        while True:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + history
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
            if len(ids) + room <= self.engine.context_length or len(history) == 1:
                return ids
            history = history[2:]  # drop the oldest user/assistant pair

    def reply(self, user_text: str):
        """Stream the assistant's answer; the history is updated once the answer is complete."""
        stream = TextStream(self.engine, self.tokenizer, self.prompt_ids(user_text), self.params)
        yield from stream
        self.history += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": stream.text.strip()}]


def run(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {session.engine.config.num_params() / 1e6:.0f}M-parameter model; "
              "/help for commands", file=stdout)
    while True:
        if interactive:
            stdout.write("\nyou> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                print("(conversation reset)", file=stdout)
            elif command == "/help":
                print(HELP, file=stdout)
            else:
                print(f"unknown command {command}; /help lists the commands", file=stdout)
            continue
        if interactive:
            stdout.write("assistant> ")
        try:
            for piece in session.reply(text):
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [interrupted]")
        except PromptError as e:  # e.g. one message longer than the context: say so, keep chatting
            stdout.write(f"[error: {e}]")
        stdout.write("\n" if interactive else "\n\n")
        stdout.flush()
    return 0
