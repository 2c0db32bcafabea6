"""How the user feels this turn, so the answer can adapt its tone.

    analyze = VaderSentiment()
    analyze("this is useless, you never get it right")   # Sentiment(label="negative", score=-0.4215)
    Pipeline([..., SentimentStage(), ...])                # emits a Sentiment frame each turn
    tone_instruction("negative")                          # a line for respond's system prompt

An analyzer is any callable `text -> Sentiment` (the `SentimentAnalyzer` protocol), so a
learned model can replace the default. The default is VADER (vaderSentiment), a lexicon and
rule scorer made for short informal text: it knows negation ("not good"), intensifiers
("very"), capitals and "!", needs no model download and takes well under a millisecond. Its
compound score in [-1, 1] is labelled with VADER's own cut-offs: >= 0.05 positive,
<= -0.05 negative, neutral between.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from parley.pipeline.frames import Frame, Sentiment, UserText
from parley.pipeline.runner import Stage, Turn

LABELS = ("positive", "neutral", "negative")
TONES = {
    "negative": "The user seems frustrated or upset: acknowledge it briefly, be calm and concrete.",
    "neutral": "",
    "positive": "The user seems pleased: keep the warm tone, and stay concise.",
}


class SentimentError(ValueError):
    pass


class SentimentAnalyzer(Protocol):
    def __call__(self, text: str) -> Sentiment: ...


class VaderSentiment:
    """VADER's compound score, labelled positive/negative beyond +-`cutoff`."""

    def __init__(self, cutoff: float = 0.05):
        if not 0.0 <= cutoff < 1.0:
            raise SentimentError(f"cutoff must be in [0, 1), got {cutoff}")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.cutoff = cutoff
        self._vader = SentimentIntensityAnalyzer()  # reads its lexicon file: do it once

    def __call__(self, text: str) -> Sentiment:
        if not isinstance(text, str):
            raise SentimentError(f"sentiment takes a string, got {type(text).__name__}")
        score = float(self._vader.polarity_scores(text)["compound"])
        label = "positive" if score >= self.cutoff else "negative" if score <= -self.cutoff else "neutral"
        return Sentiment(label, round(score, 4))


def tone_instruction(label: str) -> str:
    """A line for the system prompt that adapts the answer to the user's mood ("" if neutral)."""
    if label not in TONES:
        raise SentimentError(f"unknown sentiment label {label!r}; expected one of {', '.join(LABELS)}")
    return TONES[label]


class SentimentStage(Stage):
    """On `UserText`: emits a `Sentiment`, then passes the text on (so stages downstream find
    it with `turn.get` when the text reaches them)."""

    name = "sentiment"

    def __init__(self, analyzer: SentimentAnalyzer | None = None):
        self.analyzer = analyzer or VaderSentiment()

    def process(self, frame: Frame, turn: Turn) -> Iterator[Frame]:
        if isinstance(frame, UserText):
            sentiment = self.analyzer(frame.text)
            turn.note(self.name, sentiment.label, score=sentiment.score)
            yield sentiment
        yield frame
