"""The web UI in a real browser: Debian's Chromium driven by Playwright, against a real server
(uvicorn on a local port, SmolLM2, the real MiniLM embedder, a SQLite file), on a phone-sized
screen. Skipped when /usr/bin/chromium or the playwright package is missing:

    apt-get install -y chromium && pip install playwright==1.58.0    # no `playwright install`

The model samples, so its words vary from run to run: what is checked is what the page does
with them.
"""

import dataclasses
import re
from pathlib import Path

import httpx
import pytest

from parley.engine.engine import Engine
from parley.model.tokenizer import Tokenizer
from parley.pipeline.embed import Embedder
from parley.serve.app import Settings, create_app
from parley.store import Store
from serving import serving

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).parent / "artifacts" / "ui.png"
STAGES = ["safety_in", "sentiment", "state", "knowledge", "respond", "safety_out"]
RENT = b"# Rent\n\nThe rent is due on the first day of each month. Pay it by bank transfer to Mrs Pole.\n"


@dataclasses.dataclass
class Site:
    url: str
    db: str
    key: str
    user_id: int


@pytest.fixture(scope="module")
def site(smollm2_path, smollm2_ours, tmp_path_factory):
    """The server, answering with SmolLM2 (the session's shared copy: sensible answers, and a
    few seconds per answer on a CPU) through the assistant's pipeline, knowledge included."""
    model, _ = smollm2_ours
    db = str(tmp_path_factory.mktemp("db") / "parley.db")
    with Store(db) as store:
        ann = store.add_user("ann")
        key = store.create_api_key(ann.id)
    settings = Settings(db=db, home=tmp_path_factory.mktemp("home"), model="smollm2", stages=STAGES,
                        max_tokens=24, requests_per_minute=0)
    app = create_app(settings, engine=Engine(model), tokenizer=Tokenizer.from_gguf(smollm2_path),
                     embedder=Embedder.load())
    with serving(app) as url:
        yield Site(url, db, key, ann.id)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no browser at {CHROMIUM}: apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.58.0")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, site):
    """A phone-sized page that records every request it makes and every script error."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True,
                                  has_touch=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.requests, page.errors = [], []
    page.on("request", lambda r: page.requests.append(r.url))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    yield page
    context.close()


def answers(page):
    return page.locator("#log .msg.assistant")


def ask(page, text: str):
    """Send a message as a keyboard user would; the answer, once it is saved and has its controls."""
    before = answers(page).count()
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_label("Message", exact=True).press("Enter")
    answer = answers(page).nth(before)
    answer.locator(".actions").wait_for()
    return answer


def test_chat_feedback_documents_citations_and_trace_on_a_phone(page, site):
    from playwright.sync_api import expect

    page.goto(site.url)
    expect(page.get_by_role("alert")).to_contain_text("missing_api_key")  # no key yet: the API's error, shown
    page.get_by_label("API key").fill("pk-wrong")
    page.get_by_role("button", name="Save key").click()
    expect(page.get_by_role("alert")).to_contain_text("invalid_api_key")
    page.get_by_label("API key").fill(site.key)
    page.get_by_role("button", name="Save key").click()
    expect(page.get_by_role("alert")).to_be_hidden()
    expect(page.get_by_label("Model")).to_have_value("parley")
    # the page starts with "parley" alone and fills the list from /v1/models: wait for it, not race it
    expect(page.get_by_label("Model").locator("option")).to_have_text(["smollm2", "parley"])

    page.evaluate("document.getElementById('model').append(new Option('gpt-9'))")  # a model gone since
    page.get_by_label("Model").select_option("gpt-9")
    page.get_by_label("Message", exact=True).fill("hi")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("alert")).to_contain_text("Error 404 (model_not_found): the model 'gpt-9' does not exist")
    expect(answers(page).last).to_have_class(re.compile("failed"))
    page.get_by_label("Model").select_option("parley")

    # the answer streams into the log, which is busy meanwhile, and is what the store saved
    page.evaluate("""() => { window.busy = [];
        new MutationObserver(() => busy.push(document.getElementById('log').getAttribute('aria-busy')))
          .observe(document.getElementById('log'), {attributes: true, attributeFilter: ['aria-busy']}); }""")
    page.evaluate("""() => { window.pieces = 0;
        new MutationObserver((changes) => pieces += changes.filter((c) => c.target.matches('.msg.assistant .text')
                                                                 && c.addedNodes.length).length)
          .observe(document.getElementById('log'), {childList: true, subtree: true}); }""")
    first = ask(page, "hello there")
    assert page.evaluate("busy") == ["true", "false"] and page.evaluate("pieces") > 2  # it came in pieces
    turn_id = int(first.get_attribute("data-turn"))
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {site.key}"}) as http:
        [conv] = http.get("/api/conversations").json()["data"]
        saved = http.get(f"/api/conversations/{conv['id']}").json()["turns"]
    assert saved[-1]["id"] == turn_id and first.locator(".text").inner_text().strip() == saved[-1]["content"]

    first.get_by_role("button", name="Good").click()
    expect(first.get_by_role("status")).to_have_text("Feedback saved.")
    expect(first.get_by_role("button", name="Good")).to_have_attribute("aria-pressed", "true")
    first.get_by_role("button", name="Edit").click()
    first.get_by_label("Corrected answer").fill("Hello! How can I help?")
    first.get_by_role("button", name="Save correction").click()
    expect(first.get_by_role("status")).to_have_text("Correction saved.")
    with Store(site.db) as store:
        feedback = store.get_feedback(site.user_id, turn_id)
    assert (feedback.rating, feedback.edited_text) == (1, "Hello! How can I help?")

    page.get_by_text("Documents", exact=True).click()  # a collapsed section on a phone
    page.get_by_label("Add a document").set_input_files({"name": "rent.md", "mimeType": "text/markdown",
                                                         "buffer": RENT})
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-status")).to_have_text("rent.md: stored, 1 chunks")
    expect(page.locator("#documents")).to_contain_text("rent.md")

    second = ask(page, "When is the rent due?")
    expect(second.locator(".sources")).to_contain_text("Sources: [1] rent.md, chunk 1")
    second.get_by_role("button", name="Show source 1: rent.md, chunk 1").first.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("The rent is due on the first day of each month.")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    page.get_by_role("button", name="Trace").click()
    trace = page.get_by_role("region", name="Trace of the last answer")
    expect(trace).to_be_visible()
    expect(trace.locator("#trace-stages > li")).to_have_count(len(STAGES))
    expect(trace).to_contain_text("knowledge retrieved 1")
    trace.get_by_text("knowledge retrieved 1").click()
    expect(trace.locator("pre").nth(STAGES.index("knowledge"))).to_contain_text('"chunk_id"')
    assert re.search(r"\d+ stages, [\d.]+ ms in all", trace.locator("#trace-summary").inner_text())

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # the conversation list: reopen this conversation from a fresh page, then delete it
    page.get_by_role("button", name="New chat").click()
    expect(answers(page)).to_have_count(0)
    page.get_by_role("button", name=conv["title"], exact=True).click()
    expect(page.locator("#log .msg")).to_have_count(4)
    expect(answers(page).nth(1).locator(".sources")).to_contain_text("[1] rent.md, chunk 1")
    expect(answers(page).first.get_by_role("button", name="Good")).to_have_attribute("aria-pressed", "true")
    expect(answers(page).first.get_by_role("status")).to_have_text("Corrected earlier.")  # the feedback given then
    expect(answers(page).nth(1).get_by_role("button", name="Good")).to_have_attribute("aria-pressed", "false")
    page.get_by_role("button", name=f"Delete conversation {conv['title']}").click()
    expect(page.locator("#conversations")).to_have_text("None yet.")
    expect(answers(page)).to_have_count(0)

    assert page.errors == []
    assert all(url.startswith(site.url + "/") for url in page.requests), "the page fetched from elsewhere"


def test_page_files_and_chunk_route(site):
    with httpx.Client(base_url=site.url) as http:
        page = http.get("/")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        assert http.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/static/../app.py").status_code == 404
        assert http.get("/static/index.html").status_code == 404
        assert http.get("/api/chunks/1").status_code == 401
    with Store(site.db) as store:
        cat, bob = store.add_user("cat"), store.add_user("bob")
        keys = {"cat": store.create_api_key(cat.id), "bob": store.create_api_key(bob.id)}
        doc = store.add_document(cat.id, "notes.txt", "text/plain", ["first chunk", "second chunk"])
        [chunk] = store.search_chunks(cat.id, "second")
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {keys['cat']}"}) as http:
        got = http.get(f"/api/chunks/{chunk.chunk_id}").json()
        assert (got["text"], got["document"], got["ord"], got["document_id"]) == ("second chunk", "notes.txt", 1, doc)
        assert http.get("/api/chunks/0").status_code == 400
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {keys['bob']}"}) as http:
        missing = http.get(f"/api/chunks/{chunk.chunk_id}")  # another user's chunk is as good as none
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
