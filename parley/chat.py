"""`parley chat`: talk to the assistant in the terminal, or script it through a pipe.

    parley chat                                           # default model, full pipeline
    printf 'Hi!\\nWhat is 2+2?\\n' | parley chat temperature=0   # one user turn per line

Every message goes through the whole pipeline (safety, intent, sentiment, memory,
knowledge, web, respond, output safety). Interactive sessions show a prompt and stream the
answer; with piped input each answer is printed, then a blank line. Answers that used
documents or web pages end with a "Sources:" line giving what each [n] refers to.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

from parley.pipeline.frames import Frame, ShownText
from parley.pipeline.runner import Turn

if TYPE_CHECKING:
    from parley.pipeline.assistant import Assistant

HELP = """commands:
  /remember TEXT   keep a fact about you in long-term memory
  /forget TEXT     delete the facts that match (/forget everything clears memory)
  /memory          list what is in memory
  /sources         the documents and pages the last answer drew on
  /trace           what each stage decided in the last turn, and how long it took
  /reset           start a new conversation (memory and documents stay)
  /help            show this help
  /exit            leave (Ctrl-D works too)"""


class Session:
    """One person's conversation with a shared `Assistant` in the terminal: their store
    connection and user (the config's `db` and `user`), the current conversation and the last
    turn (for /trace and /sources). `parley.serve.client.RemoteAssistant` has the same surface,
    so `run` talks to a server just as well."""

    def __init__(self, assistant: Assistant):
        from parley.registry import store_target
        from parley.store import Store

        self.assistant, self.pipeline = assistant, assistant.pipeline
        self.store = Store(store_target(assistant.cfg.db))
        try:
            user = self.store.get_user_by_name(assistant.cfg.user) or self.store.add_user(assistant.cfg.user)
        except BaseException:
            self.store.close()
            raise
        self.user_id, self.memory = user.id, assistant.memory(self.store)
        self.conversation_id: int | None = None
        self.last: Turn | None = None

    def close(self) -> None:
        self.store.close()

    def new_conversation(self) -> None:
        self.conversation_id = None  # the next turn opens one

    def say(self, text: str) -> Iterator[Frame]:
        turn = Turn(self.user_id, self.conversation_id, store=self.store)
        self.last = turn
        try:
            yield from self.assistant.say(turn, text)
        finally:
            self.conversation_id = turn.conversation_id


def format_trace(trace: dict) -> str:
    lines = []
    for s in trace["stages"]:
        evidence = ", ".join(f"{k}={_short(v)}" for k, v in s["evidence"].items())
        lines.append(f"  {s['stage']:<11} {s['ms']:8.1f} ms  {s['decision'] or '-'}" + (f"  ({evidence})" if evidence else ""))
    lines.append(f"  {'total':<11} {trace['total_ms']:8.1f} ms")
    return "\n".join(lines)


def _short(value, limit: int = 120) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def command(session, text: str) -> str:
    """Run a /command; return what to print."""
    from parley.pipeline.state import second_person

    name, _, arg = text.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name == "/help":
        return HELP
    if name == "/reset":
        session.new_conversation()
        return "(new conversation)"
    if name == "/remember":
        fact = session.memory.remember(session.user_id, arg)
        return f"(remembered: {fact.text})"
    if name == "/forget":
        gone = session.memory.forget(session.user_id, arg)
        return "(forgot: " + "; ".join(f.text for f in gone) + ")" if gone else "(nothing in memory matches that)"
    if name == "/memory":
        facts = session.memory.all(session.user_id)
        return "\n".join(f"- {second_person(f.text)}" for f in facts) if facts else "(memory is empty)"
    if name == "/trace":
        return format_trace(session.last.trace_dict()) if session.last else "(no turn yet)"
    if name == "/sources":
        found = session.last.sources() if session.last else []
        if not found:
            return "(the last answer used no documents or web pages)"
        return "\n".join(f"[{p.n}] {p.source}, {p.location}\n    {_short(' '.join(p.text.split()), 300)}" for p in found)
    return f"unknown command {name}; /help lists the commands"


def run(session, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """The terminal loop; `stdin`/`stdout` default to the process's streams as they are when called."""
    from parley.engine.engine import PromptError
    from parley.pipeline.respond import BackendError

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        print(f"Parley ({' -> '.join(s.name for s in session.pipeline.stages)}); /help for commands", file=stdout)
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
            if text.split()[0].lower() in ("/exit", "/quit"):
                break
            try:
                print(command(session, text), file=stdout)
            except ValueError as e:
                print(f"[error: {e}]", file=stdout)
            if not interactive:
                print(file=stdout)
            continue
        if interactive:
            stdout.write("assistant> ")
        shown = ShownText()
        try:
            for frame in session.say(text):
                stdout.write(shown(frame))
                stdout.flush()
            used = session.last.sources() if session.last else []
            if used and shown.streamed:
                stdout.write("\nSources: " + "; ".join(f"[{p.n}] {p.source}, {p.location}" for p in used))
        except KeyboardInterrupt:
            stdout.write(" [interrupted]")
        except (ValueError, PromptError, BackendError) as e:  # say what went wrong, keep chatting
            stdout.write(f"[error: {e}]")
        stdout.write("\n" if interactive else "\n\n")
        stdout.flush()
    return 0
