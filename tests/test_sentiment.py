"""VADER labels, the sentiment stage in a pipeline, and tone instructions."""

import pytest

from parley.pipeline.frames import Sentiment, UserText
from parley.pipeline.runner import Pipeline, Turn
from parley.pipeline.sentiment import (
    LABELS,
    SentimentError,
    SentimentStage,
    VaderSentiment,
    tone_instruction,
)


@pytest.fixture(scope="module")
def vader():
    return VaderSentiment()


@pytest.mark.parametrize("text,label", [
    ("Thanks, that was really helpful!", "positive"),
    ("I love how clear that was", "positive"),
    ("This is useless, you never get it right.", "negative"),
    ("I'm so frustrated and angry with this", "negative"),
    ("This is not good at all", "negative"),  # negation flips "good"
    ("What is the capital of Peru?", "neutral"),
    ("", "neutral"),
])
def test_vader_labels(vader, text, label):
    result = vader(text)
    assert isinstance(result, Sentiment) and result.label == label and -1.0 <= result.score <= 1.0


def test_cutoffs_follow_the_compound_score(vader):
    score = vader("good").score
    assert 0.05 <= score < 0.9
    assert VaderSentiment(cutoff=0.9)("good").label == "neutral"
    assert vader("bad").score <= -0.05 and vader("bad").label == "negative"
    with pytest.raises(SentimentError, match="cutoff"):
        VaderSentiment(cutoff=1.5)
    with pytest.raises(SentimentError, match="string"):
        vader(None)


def test_stage_emits_sentiment_before_the_text_and_notes_it(vader):
    pipeline = Pipeline([SentimentStage(vader)])
    turn = Turn(user_id=7)
    out = pipeline(turn, "ugh, this is terrible and broken")
    assert [type(f) for f in out] == [Sentiment, UserText]
    sentiment = out[0]
    assert sentiment.label == "negative" and turn.get(Sentiment) == sentiment
    entry = turn.trace_dict()["stages"][0]
    assert entry["stage"] == "sentiment" and entry["decision"] == "negative"
    assert entry["evidence"] == {"score": sentiment.score}


def test_any_callable_is_an_analyzer():
    stage = SentimentStage(lambda text: Sentiment("positive", 1.0))
    out = Pipeline([stage])(Turn(user_id=1), "whatever")
    assert out[0] == Sentiment("positive", 1.0)
    assert isinstance(SentimentStage().analyzer, VaderSentiment)  # the default


def test_tone_instruction():
    assert "frustrated" in tone_instruction("negative") and "calm" in tone_instruction("negative")
    assert tone_instruction("neutral") == ""
    assert tone_instruction("positive")
    assert set(LABELS) == {"positive", "neutral", "negative"}
    with pytest.raises(SentimentError, match="expected one of positive, neutral, negative"):
        tone_instruction("angry")
