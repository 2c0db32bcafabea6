"""The web UI in a real browser: Debian's Chromium driven by Playwright, against a real server
(uvicorn on a local port, SmolLM2, the real MiniLM embedder, a SQLite file), on a phone-sized
screen. Skipped when /usr/bin/chromium or the playwright package is missing:

    apt-get install -y chromium && pip install playwright==1.58.0    # no `playwright install`

The model samples, so its words vary from run to run: what is checked is what the page does
with them. Exact text (hostile Markdown) reaches the page the way a real answer does: from the
stored conversation, with a document uploaded through the API behind its citation. Each test
other than the first signs in as its own user, so no test sees another's conversations.
"""

import dataclasses
import re
from pathlib import Path

import httpx
import pytest

from parley.model.tokenizer import Tokenizer
from parley.pipeline.embed import Embedder
from parley.serve.app import Settings, create_app
from parley.store import Store
from serving import GatedEngine, serving

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
SCREENSHOT = ARTIFACTS / "ui.png"
AXE = Path(__file__).parent / "vendor" / "axe.min.js"  # axe-core 4.10.3 (MPL-2.0), loaded by the test only
STAGES = ["safety_in", "sentiment", "state", "knowledge", "respond", "safety_out"]
RENT = b"# Rent\n\nThe rent is due on the first day of each month. Pay it by bank transfer to Mrs Pole.\n"


@dataclasses.dataclass
class Site:
    url: str
    db: str
    key: str
    user_id: int
    engine: GatedEngine

    def user(self, name: str) -> tuple[int, str]:
        """A new user of this server: (id, API key)."""
        with Store(self.db) as store:
            user = store.add_user(name)
            return user.id, store.create_api_key(user.id)


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
    engine = GatedEngine(model, after=0)  # open until a test closes the gate to hold an answer mid-way
    engine.gate.set()
    app = create_app(settings, engine=engine, tokenizer=Tokenizer.from_gguf(smollm2_path), embedder=Embedder.load())
    with serving(app) as url:
        yield Site(url, db, key, ann.id, engine)
    engine.gate.set()
    engine.close()


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
    first = ask(page, "hello there")  # that it shows in pieces as they come: the stop below, with the engine held
    assert page.evaluate("busy") == ["true", "false"]
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
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()  # asked first
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


# --- issue 18: rich answers, control, conversations, look and reach, settings ---------------------------

# Everything here that could run script sets window.pwned; none of it may.
HOSTILE = """# Answer

Click [here](javascript:window.pwned=1), [there](JaVaScRiPt:window.pwned=2) or <javascript:window.pwned=3>.

<img src="x" onerror="window.pwned=4"> and <script>window.pwned=5</script>

In a code span: `<img src=x onerror=window.pwned=6>`; a picture: ![pic](javascript:window.pwned=7)

[data](data:text/html;base64,PHNjcmlwdD53aW5kb3cucHduZWQ9ODwvc2NyaXB0Pg==) <a href="#" onclick="window.pwned=9">a</a>

<svg onload="window.pwned=10"></svg> The rent is due on the first [1].

```python
def rent():
    return "<b>not bold</b>"  # a comment
```

```"><img src=x onerror=window.pwned=11>
in a fence with a hostile language name
```

| month | due |
|---|---|
| May | 1st |

A real link: https://example.org/page
"""
EVIL_DOC = b"# Evil\n\nThe rent is due on the first. <script>window.pwned=12</script> <img src=x onerror=window.pwned=13>\n"


def signed_in(browser, site, name, **options):
    """A page of a new user `name`, key already saved: (page, user id)."""
    user_id, key = site.user(name)
    context = browser.new_context(**{"viewport": {"width": 390, "height": 844}, **options})
    context.add_init_script(f"localStorage.setItem('parley.key', {key!r})")
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=site.url)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.errors, page.key = [], key
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(site.url)
    page.locator("#settings-box dd").first.wait_for(state="attached")  # the settings came: the key works
    return page, user_id


def test_hostile_markdown_stays_inert_and_rich_answers_render(browser, site):
    from playwright.sync_api import expect

    page, user_id = signed_in(browser, site, "mallory")
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {page.key}"}) as http:
        up = http.post("/api/knowledge", files={"file": ("evil.txt", EVIL_DOC, "text/plain")})
        assert up.status_code == 201, up.text
    with Store(site.db) as store:  # an answer as the pipeline saves it: text, and a trace citing the document
        [chunk] = store.search_chunks(user_id, "rent")
        conv = store.create_conversation(user_id, "<img src=x onerror=window.pwned=14>")
        trace = {"stages": [
            {"stage": "knowledge", "decision": "retrieved 1", "ms": 1.0,
             "evidence": {"min_similarity": 0.3, "candidates": [{"chunk_id": chunk.chunk_id, "cosine": 0.9,
                                                                 "bm25_rank": 1, "dense_rank": 1}]}},
            {"stage": "respond", "decision": "generating", "ms": 1.0, "evidence": {"passages": ["[1] evil.txt, chunk 1"]}}],
            "total_ms": 2.0}
        store.add_exchange(user_id, conv.id, "Show <b>me</b> <img src=x onerror=window.pwned=15>", HOSTILE, trace)
    page.reload()
    page.get_by_role("button", name=conv.title, exact=True).click()
    answer = answers(page).first
    answer.locator(".actions").wait_for()
    expect(answer.locator(".sources")).to_contain_text("[1] evil.txt, chunk 1")

    md = answer.locator(".text")
    expect(md.locator("h1")).to_have_text("Answer")  # Markdown became structure
    expect(md.locator("table td").first).to_have_text("May")
    expect(md.locator("code").filter(has_text="<img src=x onerror=window.pwned=6>")).to_have_count(1)  # shown as text
    python = md.locator(".code").first
    expect(python.locator(".hljs-keyword").first).to_have_text("def")  # highlighted
    expect(python.get_by_role("button", name="Copy code (python)")).to_be_visible()
    link = md.get_by_role("link", name="https://example.org/page")
    expect(link).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(link).to_have_attribute("target", "_blank")
    expect(md).to_contain_text("Click [here](javascript:window.pwned=1)")  # no link: markdown-it refuses it
    found = page.evaluate("""() => ({  // anywhere in the page: the answer, the title in the list, the question
        elements: document.querySelectorAll('body script, body img, body svg:not(.icon), body iframe').length,
        handlers: [...document.querySelectorAll('body *')].filter(n => [...n.attributes].some(a => /^on/i.test(a.name))).length,
        scripted: [...document.querySelectorAll('body [href], body [src]')].filter(
                     n => /^\\s*(javascript|data|vbscript):/i.test(n.getAttribute('href') || n.getAttribute('src'))).length})""")
    assert found == {"elements": 0, "handlers": 0, "scripted": 0}
    expect(page.locator("#log .msg.user .text")).to_have_text("Show <b>me</b> <img src=x onerror=window.pwned=15>")
    expect(page.locator("#conversations .open")).to_have_text(conv.title)

    md.get_by_role("button", name="Show source 1: evil.txt, chunk 1").click()  # the [1] in the running text
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("<script>window.pwned=12</script>")  # the passage, as text
    assert dialog.locator("script, img").count() == 0
    page.keyboard.press("Escape")

    python.get_by_role("button", name="Copy code (python)").click()
    expect(python.get_by_role("button", name="Copy code (python)")).to_have_attribute("data-copied", "true")
    assert page.evaluate("navigator.clipboard.readText()") == 'def rent():\n    return "<b>not bold</b>"  # a comment\n'

    page.get_by_role("button", name="Trace").click()  # the trace shows the stored evidence as text
    expect(page.locator("#trace-stages")).to_contain_text("knowledge retrieved 1")
    page.wait_for_load_state("networkidle")  # any image the page had let in has failed to load by now
    assert page.evaluate("window.pwned") is None and page.errors == []


def test_a_growing_answer_rerenders_only_what_changed(browser, site):
    page, _ = signed_in(browser, site, "streamer")
    kept = page.evaluate("""() => {
        const box = document.createElement('div');
        renderMarkdown(box, 'First paragraph.\\n\\n```python\\nx = 1');
        const [p, code] = box.children;
        renderMarkdown(box, 'First paragraph.\\n\\n```python\\nx = 1\\ny = 2\\n```\\n\\nThird');
        return {p: box.children[0] === p, code: box.children[1] === code, n: box.children.length,
                text: box.children[1].querySelector('code').textContent};
    }""")
    assert kept == {"p": True, "code": False, "n": 3, "text": "x = 1\ny = 2\n"}


def metric(site, name: str) -> float:
    text = httpx.get(site.url + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_stop_regenerate_edit_and_copy(browser, site):
    from playwright.sync_api import expect

    page, user_id = signed_in(browser, site, "carol")
    first = ask(page, "Tell me about the sea.")
    expect(first.locator(".meta")).to_contain_text("Answered by smollm2")
    first.get_by_role("button", name="Copy answer").click()
    expect(first.get_by_role("button", name="Copy answer")).to_have_attribute("data-copied", "true")
    with Store(site.db) as store:
        [conv] = store.list_conversations(user_id)
        old_q, old_a = store.messages(user_id, conv.id)
    assert page.evaluate("navigator.clipboard.readText()") == old_a.content

    # regenerate: a new answer to the same question; the old one stays, as a rejected alternative
    first.get_by_role("button", name="Regenerate answer").click()
    second = answers(page).first
    expect(second.locator(".earlier")).to_contain_text("Earlier answer (replaced)")
    second.locator(".actions").wait_for()
    with Store(site.db) as store:
        live = store.messages(user_id, conv.id)
        every = store.messages(user_id, conv.id, withdrawn=True)
        rejected = store.get_feedback(user_id, old_a.id)
    assert [m.content for m in live] == [old_q.content, live[1].content] and live[1].id > old_a.id
    assert [m.id for m in every[:2]] == [old_q.id, old_a.id] and every[1].withdrawn_at is not None
    assert (rejected.rating, rejected.kind) == (-1, "regenerated")
    expect(page.locator("#log .msg")).to_have_count(2)

    # edit and resend: the question and its answer leave the history, the new question is answered
    page.locator("#log .msg.user").first.get_by_role("button", name="Edit message").click()
    page.get_by_label("Edit your message").fill("What is a whale?")
    page.get_by_role("button", name="Send edited message").click()
    expect(page.locator("#log .msg.user .text")).to_have_text("What is a whale?")  # the old pair is gone
    answers(page).first.locator(".actions").wait_for()
    with Store(site.db) as store:
        live = store.messages(user_id, conv.id)
        assert [m.content for m in live][0] == "What is a whale?" and len(live) == 2
        assert store.get_feedback(user_id, every[-1].id) is None  # an edit rejects no answer

    # stop: let the answer out a few tokens at a time until its first words show (the output
    # safety stage holds text until a line or sentence ends), stop from the keyboard while the
    # engine is held, then let it step again: the request ends at the next step
    engine, before, start = site.engine, len(site.engine.requests), site.engine.stats()["decode_tokens"]
    engine.after = start + 4
    engine.gate.clear()
    try:
        page.get_by_label("Message", exact=True).fill("Write a numbered list of ten fruits.")
        page.get_by_label("Message", exact=True).press("Enter")
        stopped = answers(page).nth(1)
        for _ in range(300):
            if stopped.locator(".text").inner_text().strip():
                break
            if engine.stats()["decode_tokens"] >= engine.after:  # held, and nothing shown yet
                engine.after += 4
                engine.gate.set()  # wakes the held step; clear at once, so it holds again 4 tokens on
                engine.gate.clear()
            page.wait_for_timeout(100)
        held = engine.after - start  # tokens this answer was let have
        # its first words show while the engine holds the rest: the answer streams into the page
        assert stopped.locator(".text").inner_text().strip() and not engine.requests[before].done, held
        expect(page.get_by_role("button", name="Stop")).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    finally:
        engine.gate.set()
    request = engine.requests[before]
    assert request.wait(timeout=30) == "cancelled" and len(request.tokens) <= held + 2  # within a step of the stop
    assert request.params.max_tokens > held + 2
    for _ in range(100):  # the server's view: nothing generating or streaming any more
        if metric(site, "parley_generating") == 0 and metric(site, "parley_active_streams") == 0:
            break
        page.wait_for_timeout(100)
    else:
        raise AssertionError(httpx.get(site.url + "/metrics").text)
    expect(stopped.locator(".meta")).to_contain_text("stopped")
    stopped.locator(".actions").wait_for()
    expect(stopped).to_have_attribute("data-turn", re.compile(r"\d+"))  # the partial answer, as saved
    with Store(site.db) as store:
        saved = store.messages(user_id, conv.id)[-1]
    assert saved.id == int(stopped.get_attribute("data-turn")) and saved.content == stopped.evaluate("n => n.raw")
    assert page.errors == []


def test_conversations_rename_search_delete_and_shortcuts(browser, site):
    from playwright.sync_api import expect

    page, dan = signed_in(browser, site, "dan")  # no conversations yet: the list says so
    expect(page.locator("#conversations")).to_have_text("None yet.")
    with Store(site.db) as store:
        eve = store.add_user("eve").id
        bread = store.create_conversation(dan, "Bread")
        store.add_exchange(dan, bread.id, "How long does sourdough rise?", "About 4 to 12 hours.",
                           model="smollm2, imported 2026-12-01T09:00:00")
        tax = store.create_conversation(dan, "Tax return")
        store.add_exchange(dan, tax.id, "When is the deadline?", "The end of July.")  # saved without a model
        theirs = store.create_conversation(eve, "Sourdough secrets")
        store.add_exchange(eve, theirs.id, "sourdough?", "Sourdough!")
    page.reload()
    titles = page.locator("#conversations .open")
    expect(titles).to_have_text(["Tax return", "Bread"])  # newest first

    titles.filter(has_text="Bread").click()  # a reopened answer still says which model wrote it
    expect(page.locator("#log .msg.assistant .meta")).to_have_text(
        "Answered by smollm2, imported 2026-12-01T09:00:00 through the Parley assistant")
    titles.filter(has_text="Tax return").click()
    expect(page.locator("#log .msg.assistant .meta")).to_have_text("Answered by the Parley assistant (model not recorded)")

    page.get_by_label("Search conversations").fill("SOURDOUGH")  # in a message, any case; never eve's
    expect(titles).to_have_text(["Bread"])
    page.get_by_label("Search conversations").fill("no such words")
    expect(page.locator("#conversations")).to_have_text("No conversation mentions “no such words”.")
    page.get_by_label("Search conversations").fill("")
    expect(titles).to_have_text(["Tax return", "Bread"])
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {page.key}"}) as http:
        assert [c["title"] for c in http.get("/api/conversations", params={"q": "sourdough"}).json()["data"]] == ["Bread"]
        assert http.patch(f"/api/conversations/{theirs.id}", json={"title": "mine"}).status_code == 404
        assert http.patch(f"/api/conversations/{bread.id}", json={"title": "  "}).status_code == 400

    page.get_by_role("button", name="Rename conversation Tax return").click()
    page.get_by_label("New title for conversation Tax return").fill("Taxes 2026")
    page.get_by_label("New title for conversation Tax return").press("Enter")
    expect(titles).to_have_text(["Taxes 2026", "Bread"])
    with Store(site.db) as store:
        assert store.get_conversation(dan, tax.id).title == "Taxes 2026"

    page.get_by_role("button", name="Delete conversation Bread").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Delete the conversation “Bread”")
    dialog.get_by_role("button", name="Cancel").click()
    expect(titles).to_have_text(["Taxes 2026", "Bread"])
    page.get_by_role("button", name="Delete conversation Bread").click()
    dialog.get_by_role("button", name="Delete").click()
    expect(titles).to_have_text(["Taxes 2026"])
    with Store(site.db) as store:
        assert store.get_conversation(dan, bread.id) is None and store.get_conversation(eve, theirs.id)

    titles.first.click()
    expect(page.locator("#log .msg")).to_have_count(2)
    page.keyboard.press("Control+Shift+O")  # new chat
    expect(page.locator("#log .msg")).to_have_count(0)
    expect(page.locator("#chat-title")).to_have_text("New conversation")
    page.get_by_role("button", name="Trace").focus()
    page.keyboard.press("Shift+Escape")  # to the message box
    expect(page.get_by_label("Message", exact=True)).to_be_focused()
    assert page.errors == []


def axe_violations(page) -> list[str]:
    page.add_script_tag(path=str(AXE))
    found = page.evaluate("axe.run(document, {resultTypes: ['violations']}).then(r => r.violations)")
    return [f"{v['id']} ({v['impact']}): {[n['target'] for n in v['nodes']]}" for v in found
            if v["impact"] in ("serious", "critical")]


def test_dark_theme_narrow_screen_icons_and_accessibility(browser, site):
    from playwright.sync_api import expect

    page, user_id = signed_in(browser, site, "frank", viewport={"width": 360, "height": 740}, is_mobile=True,
                              has_touch=True, bypass_csp=True)  # bypass_csp: only to load axe from the test
    with Store(site.db) as store:
        conv = store.create_conversation(user_id, "A rather long conversation title that has to wrap somewhere")
        store.add_exchange(user_id, conv.id, "Show me code", "Here:\n\n```python\nprint('a very long line of code that will not fit on a narrow phone screen at all')\n```\n\n| a | b | c | d | e | f | g | h |\n|---|---|---|---|---|---|---|---|\n| aaaaaaaa | bbbbbbbb | cccccccc | dddddddd | eeeeeeee | ffffffff | gggggggg | hhhhhhhh |")
        store.add_memory(user_id, "My cat is called Tom.")
    page.reload()
    page.get_by_role("button", name=conv.title, exact=True).click()
    answers(page).first.locator(".actions").wait_for()
    for box in ("documents-box", "settings-box"):
        page.locator(f"#{box} summary").click()

    def background() -> list[int]:
        return [int(x) for x in re.findall(r"\d+", page.evaluate("getComputedStyle(document.documentElement).backgroundColor"))[:3]]

    page.emulate_media(color_scheme="light")
    assert sum(background()) > 600
    assert axe_violations(page) == []
    page.emulate_media(color_scheme="dark")
    assert sum(background()) < 150  # the dark theme, from the system setting alone
    assert axe_violations(page) == []  # contrast included

    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"the page scrolls sideways: {width} px"
    controls = page.locator("button, input, select, textarea, summary, a[href]")
    outside = controls.evaluate_all("""ns => ns.filter(n => n.getClientRects().length && !n.closest('dialog:not([open])') && !n.matches('.skip:not(:focus)'))
        .map(n => [n.getBoundingClientRect(), n]).filter(([r, n]) => r.left < 0 || r.right > 360
                  || (r.width < 24 && !n.matches('.cite, a')))
        .map(([r, n]) => `${n.tagName} ${n.getAttribute('aria-label') || n.textContent.trim()} ${r.left}-${r.right}`)""")
    assert outside == []  # every control on screen and big enough to press
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-360-dark.png"), full_page=True)

    text = page.locator("body").inner_text()
    assert not re.search("[\U0001F300-\U0001FAFF\u2600-\u27BF]", text), "an emoji: it needs an emoji font"
    for name in ("Copy answer", "Regenerate answer", "Good", "Bad", "Send", "New chat"):
        expect(page.get_by_role("button", name=name, exact=True).locator("svg.icon")).to_have_count(1)
    assert page.errors == []


def test_settings_show_model_persona_stages_memory_and_documents(browser, site):
    from playwright.sync_api import expect

    page, user_id = signed_in(browser, site, "grace")
    page.locator("#settings-box summary").click()
    facts = page.locator("#server-settings")
    expect(facts).to_contain_text("Model" + "smollm2")
    expect(facts).to_contain_text("Stages" + " → ".join(STAGES))
    expect(facts).to_contain_text("You are Parley")  # the persona parley serve runs with
    expect(page.locator("#memory")).to_have_text("Nothing yet.")
    page.get_by_label("Remember a fact").fill("My sister lives in Oslo.")
    page.get_by_role("button", name="Remember").click()
    expect(page.locator("#memory .name")).to_have_text(["My sister lives in Oslo"])  # as the memory keeps it
    with Store(site.db) as store:
        assert [f.text for f in store.list_memory(user_id)] == ["My sister lives in Oslo"]
    page.get_by_role("button", name="Forget: My sister lives in Oslo").click()
    expect(page.locator("#memory")).to_have_text("Nothing yet.")
    with Store(site.db) as store:
        assert store.list_memory(user_id) == []
        store.add_document(user_id, "plan.txt", "text/plain", ["the plan"])
    page.reload()
    page.locator("#documents-box summary").click()
    expect(page.locator("#documents .name")).to_have_text(["plan.txt"])
    page.get_by_role("button", name="Delete document plan.txt").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page.locator("#documents")).to_have_text("None yet.")
    assert page.errors == []


def test_settings_search_and_withdraw_routes(site):
    other_id, other_key = site.user("heidi")
    with Store(site.db) as store:
        conv = store.create_conversation(site.user_id, "Ann's")
        q, a = store.add_exchange(site.user_id, conv.id, "question", "answer")
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {other_key}"}) as http:
        got = http.get("/api/settings").json()
        assert (got["model"], got["stages"], got["version"]) == ("smollm2", STAGES, None)
        assert http.get("/api/conversations", params={"q": "question"}).json()["data"] == []  # not ann's
        assert http.post(f"/api/turns/{a.id}/withdraw", json={"reason": "regenerate"}).status_code == 404
        assert http.get("/static/vendor/purify.min.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/static/vendor/purify.LICENSE").status_code == 404
    assert httpx.get(site.url + "/api/settings").status_code == 401
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {site.key}"}) as http:
        wrong = http.post(f"/api/turns/{q.id}/withdraw", json={"reason": "regenerate"})
        assert wrong.status_code == 400 and "only an answer" in wrong.json()["error"]["message"]
        assert http.post(f"/api/turns/{a.id}/withdraw", json={"reason": "undo"}).status_code == 400
        done = http.post(f"/api/turns/{a.id}/withdraw", json={"reason": "edit"}).json()
        assert done == {"conversation_id": conv.id, "question": "question", "withdrawn": [q.id, a.id]}
        assert http.get(f"/api/conversations/{conv.id}").json()["turns"] == []
        again = http.post(f"/api/turns/{a.id}/withdraw", json={"reason": "edit"})
        assert again.status_code == 400 and "withdrawn already" in again.json()["error"]["message"]
        http.delete(f"/api/conversations/{conv.id}")


def test_store_search_rename_and_withdraw(tmp_path):
    """The store methods behind the page's conversation controls, without a server."""
    with Store(tmp_path / "p.db") as store:
        ann, bob = store.add_user("ann").id, store.add_user("bob").id
        conv = store.create_conversation(ann, "100% rye_bread")
        q1, a1 = store.add_exchange(ann, conv.id, "How long to bake?", "About an hour.")
        q2, a2 = store.add_exchange(ann, conv.id, "At what heat?", "220 C.")
        assert [c.id for c in store.search_conversations(ann, "100%")] == [conv.id]  # % and _ are literal
        assert store.search_conversations(ann, "1000%") == [] and store.search_conversations(ann, "rye bread") == []
        assert [c.id for c in store.search_conversations(ann, "ABOUT AN")] == [conv.id]
        assert store.search_conversations(bob, "hour") == []
        assert store.rename_conversation(bob, conv.id, "mine") is None
        assert store.rename_conversation(ann, conv.id, "Rye").title == "Rye"
        with pytest.raises(ValueError, match="non-empty"):
            store.rename_conversation(ann, conv.id, " ")
        with pytest.raises(ValueError, match="unknown turn"):
            store.withdraw(bob, a2.id, regenerated=True)
        with pytest.raises(ValueError, match="only an answer"):
            store.withdraw(ann, q2.id, regenerated=True)
        assert [m.id for m in store.withdraw(ann, a2.id, regenerated=True)] == [q2.id, a2.id]
        assert (store.get_feedback(ann, a2.id).kind, store.get_feedback(ann, a2.id).rating) == ("regenerated", -1)
        assert [m.id for m in store.messages(ann, conv.id)] == [q1.id, a1.id]
        assert store.search_conversations(ann, "220") == []  # withdrawn text is not searched
        with pytest.raises(ValueError, match="withdrawn already"):
            store.withdraw(ann, q2.id)
        assert [m.id for m in store.withdraw(ann, q1.id)] == [q1.id, a1.id]  # an edit: no feedback
        assert store.messages(ann, conv.id) == [] and store.get_feedback(ann, a1.id) is None
        assert len(store.messages(ann, conv.id, withdrawn=True)) == 4


def test_regenerate_and_edit_with_a_raw_model_resend_the_history_shown(browser, site):
    """A raw model keeps no history on the server: the page sends what it shows, so a replaced
    answer or an edited message must be gone from what it sends next."""
    from playwright.sync_api import expect

    page, _ = signed_in(browser, site, "ivan")
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json["messages"]) if r.url.endswith("/v1/chat/completions") else None)
    expect(page.get_by_label("Model").locator("option")).to_have_text(["smollm2", "parley"])
    page.get_by_label("Model").select_option("smollm2")
    first = ask(page, "Name a colour.")
    expect(first.locator(".meta")).to_have_text("Answered by smollm2")
    first.get_by_role("button", name="Regenerate answer").click()
    expect(answers(page).first.locator(".earlier")).to_be_attached()
    answers(page).first.locator(".actions").wait_for()
    ask(page, "Another one?")
    assert sent[1] == [{"role": "user", "content": "Name a colour."}]  # the replaced answer is not sent
    assert [m["content"] for m in sent[2]][::2] == ["Name a colour.", "Another one?"]
    page.locator("#log .msg.user").first.get_by_role("button", name="Edit message").click()
    page.get_by_label("Edit your message").fill("Name a fruit.")
    page.get_by_role("button", name="Send edited message").click()
    expect(page.locator("#log .msg")).to_have_count(2)
    answers(page).first.locator(".actions").wait_for()
    assert sent[3] == [{"role": "user", "content": "Name a fruit."}]
    assert page.errors == []
