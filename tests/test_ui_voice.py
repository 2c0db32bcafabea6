"""The Talk button in a real browser: Debian's Chromium, driven by Playwright, whose microphone
is Chromium's fake audio device playing a WAV of piper's speech (on a loop, with a pause after
each time), against a real server (uvicorn, the tiny model, Whisper tiny.en, piper). The page
shows the live transcript, the turn, plays the answer's audio, and a second time through the
loop speaks over an answer held mid-way: the page is told it was interrupted, the engine's
request is cancelled, and the store records the barge-in. Skipped where test_ui.py is."""

import time
from pathlib import Path

import numpy as np
import pytest

from parley.engine.config import EngineConfig
from parley.serve.app import create_app
from parley.serve.settings import Settings
from parley.store import Store
from parley.voice.audio import Clip, resample, wav_bytes
from serving import GatedEngine, serving

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")
CHROMIUM = Path("/usr/bin/chromium")
ASK = "Turn on the kitchen lights."


@pytest.fixture(scope="module")
def microphone(tmp_path_factory) -> Path:
    """What the fake microphone says, again and again: a pause, the question, a pause long enough for a whole answer.
    The first pause is long (2 s) so that the page is streaming before the question starts: a capture
    that began mid-question heard a fragment ("like.") as the first turn, and the test waited for
    "kitchen" in vain."""
    from parley.voice.tts import load_tts

    clip = load_tts("default").synthesize(ASK)
    speech = resample(clip.samples, clip.rate, 48_000)
    samples = np.concatenate([np.zeros(int(2.0 * 48_000)), speech, np.zeros(int(4.0 * 48_000))]).astype(np.float32)
    path = tmp_path_factory.mktemp("mic") / "ask.wav"
    path.write_bytes(wav_bytes(Clip(samples, 48_000)))
    return path


@pytest.fixture(scope="module")
def browser(microphone):
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.58.0")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}", "--autoplay-policy=no-user-gesture-required"])
        yield browser
        browser.close()


@pytest.fixture
def site(tiny768_registry, tmp_path):
    model, tokenizer, _ = tiny768_registry.load("tiny768")
    engine = GatedEngine(model, after=2)  # the first answer holds after two tokens, until the test opens the gate
    db = str(tmp_path / "p.db")
    with Store(db) as store:
        ann = store.add_user("ann")
        key = store.create_api_key(ann.id)
    settings = Settings(db=db, home=tiny768_registry.home, model="tiny768", engine=EngineConfig(dtype="float32"),
                        stages=["respond"], max_tokens=16, temperature=0.0, requests_per_minute=0)
    with serving(create_app(settings, engine=engine, tokenizer=tokenizer)) as url:
        yield url, key, db, ann.id, engine
        engine.gate.set()
    engine.close()


@pytest.mark.slow  # 12 s on 2 cores; .ci/run runs it (--runslow)
def test_talk_hears_answers_speaks_and_is_interrupted_by_speech(browser, site):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # Whisper and piper on a busy CPU: seconds, not milliseconds
    url, key, db, user_id, engine = site
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    context.grant_permissions(["microphone"], origin=url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Save key").click()
    talk = page.get_by_role("button", name="Talk")
    talk.click()
    expect(talk).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#voice-transcript")).to_contain_text("kitchen", ignore_case=True)  # the live transcript
    expect(page.locator("#log .msg.user").first).to_contain_text("kitchen", ignore_case=True)
    deadline = time.monotonic() + 60
    while not (engine.requests and len(engine.requests[0].tokens) >= 2):  # the first answer, held mid-way
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first = engine.requests[0]
    # the loop says the question again over the held answer: a barge-in
    expect(page.locator("#log .msg.assistant.interrupted").first).to_be_visible()
    assert first.cancelled
    engine.gate.set()
    assert first.wait(timeout=60) == "cancelled"
    expect(page.locator("#log .msg.assistant").first).to_contain_text("interrupted")
    expect(page.locator("#log .msg.user")).to_have_count(2, timeout=90_000)  # the new utterance: the next turn
    deadline = time.monotonic() + 90
    while page.evaluate("() => voice.played") == 0:  # an answer's audio was played (no eval: the page's CSP)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    talk.click()
    expect(talk).to_have_attribute("aria-pressed", "false")
    assert errors == []
    with Store(db) as store:
        (conversation,) = store.list_conversations(user_id)
        messages = store.messages(user_id, conversation.id)
        assert messages[1].role == "assistant" and messages[1].content.endswith("[interrupted]")
        assert store.get_feedback(user_id, messages[1].id).kind == "barge-in"
    context.close()
