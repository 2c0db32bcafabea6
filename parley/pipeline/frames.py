"""The data one turn is made of: typed frames that stages receive, emit and record.

A turn starts as one `UserText` frame (a voice front end would start with `Audio` and turn
it into a `Transcript`). Each stage of the pipeline receives frames one at a time and emits
zero or more: the NLU stage passes the text on and adds an `Intent` and `Slots`, knowledge
adds `Passages`, respond turns the text into a stream of `TextDelta`s, and output safety
lets them through, holds them back, or ends the turn with a `Refusal`.

Data frames carry what a stage found; system frames (`Interrupt`) steer the run and are
kept apart so that a barge-in can cancel queued work. Every frame is a small frozen
dataclass, so what a stage decided can be stored, printed and compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Frame:
    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **asdict(self)}


# --- data frames: what the turn is about --------------------------------------------------


@dataclass(frozen=True)
class Audio(Frame):
    """Raw speech in (for the voice front end): 16-bit mono PCM."""

    pcm: bytes
    sample_rate: int


@dataclass(frozen=True)
class Transcript(Frame):
    text: str
    confidence: float = 1.0


@dataclass(frozen=True)
class UserText(Frame):
    """What the user said, as text: typed, or a transcript passed on."""

    text: str


@dataclass(frozen=True)
class Intent(Frame):
    name: str  # "out_of_scope" when no intent is confident enough
    confidence: float
    ranking: tuple[tuple[str, float], ...] = ()  # best few (name, probability)


@dataclass(frozen=True)
class Slots(Frame):
    """Slot values from this turn plus those carried over from earlier turns."""

    values: dict[str, Any]


@dataclass(frozen=True)
class Sentiment(Frame):
    label: str  # "positive" | "neutral" | "negative"
    score: float  # compound score in [-1, 1]


@dataclass(frozen=True)
class MemoryRecall(Frame):
    """Long-term facts about this user that bear on the turn."""

    facts: tuple[str, ...]


@dataclass(frozen=True)
class MemoryUpdate(Frame):
    """The turn changed long-term memory: `action` is "remembered" or "forgot"."""

    action: str
    facts: tuple[str, ...]


@dataclass(frozen=True)
class Passage:
    """One retrieved piece of text, numbered for citation as [n]."""

    n: int
    source: str  # document name or URL
    location: str  # "chunk 3" / "page"
    text: str
    score: float = 0.0
    document_id: int | None = None
    chunk_id: int | None = None


@dataclass(frozen=True)
class Passages(Frame):
    """Text from the user's knowledge base or the web. It is data for the answer, never
    instructions to follow: respond quotes it inside fences it tells the model not to obey."""

    items: tuple[Passage, ...]
    origin: str  # "knowledge" | "web"


@dataclass(frozen=True)
class SafetyVerdict(Frame):
    where: str  # "input" | "output"
    action: str  # "allow" | "rewrite" | "refuse"
    principle: str | None = None  # constitution id, e.g. "C3"
    reason: str = ""


@dataclass(frozen=True)
class TextDelta(Frame):
    """A piece of the assistant's answer, in the order it was generated."""

    text: str


@dataclass(frozen=True)
class EndOfAnswer(Frame):
    """The respond stage has emitted its last TextDelta: stages that hold text back flush now."""


@dataclass(frozen=True)
class Refusal(Frame):
    """The turn's answer when a principle forbids a normal one: shown instead of (or after)
    any text already streamed."""

    text: str
    principle: str


@dataclass(frozen=True)
class Notice(Frame):
    """A message from the system rather than the model (a command's result, a fetch error)."""

    text: str


# --- system frames: steering the run -------------------------------------------------------


@dataclass(frozen=True)
class SystemFrame(Frame):
    pass


@dataclass(frozen=True)
class Interrupt(SystemFrame):
    """The user spoke over the answer (barge-in) or the client went away: stop generating."""

    reason: str = ""


@dataclass
class TraceEntry:
    """What one stage decided on what evidence, and how long it took."""

    stage: str
    decision: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    ms: float = 0.0


# --- what the user is shown -----------------------------------------------------------------


class ShownText:
    """What the user sees of an answer, frame by frame: the streamed text, notices and refusals
    on their own lines, an interruption marked. The one place this is decided: the terminal
    prints it, the server streams it, and the store saves it (`shown_text`)."""

    def __init__(self):
        self.streamed = False  # something is on the answer's line(s) already
        self.after_notice = False  # a notice ends its own line

    def __call__(self, frame: Frame) -> str:
        if isinstance(frame, TextDelta):
            piece = ("\n" if self.after_notice else "") + frame.text
            self.streamed, self.after_notice = True, False
            return piece
        if isinstance(frame, (Notice, Refusal)):
            piece = ("\n" if self.streamed else "") + frame.text
            self.streamed = self.after_notice = True
            return piece
        if isinstance(frame, Interrupt) and frame.reason != "safety":
            return " [interrupted]"
        return ""


def shown_text(frames: list[Frame]) -> str:
    """The whole answer as the user saw it, without surrounding whitespace: what is saved."""
    shown = ShownText()
    return "".join(shown(f) for f in frames).strip()
