"""Web access against a real HTTP server on 127.0.0.1: SSRF refusals (every redirect hop),
robots.txt, redirects, limits, timeouts, content types, extraction, the cache, a fake
SearXNG speaking its JSON API, and the web stage in a pipeline."""

import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from parley.pipeline.frames import Frame, Intent, Notice, Passages, Slots, UserText
from parley.pipeline.runner import Pipeline, Stage, Turn
from parley.pipeline.web import (Fetcher, SearxngSearch, WebConfig, WebError, WebStage, address_refusal,
                                 find_url)
import parley.pipeline.web as web_module
from tests.websrv import Reply, serve

ARTICLE = """<html><head><title>Otters of the Coast</title><script>var tracker = 1;</script></head><body>
<nav><a href="/">Home</a> | <a href="/about">About us</a> | <a href="/shop">Shop the sale now</a></nav>
<div class="sidebar">Subscribe to our newsletter for weekly deals!</div>
<article><h1>Otters of the Coast</h1>
<p>Sea otters use stones as tools to crack open shellfish, a behaviour seen along the whole Pacific coast.</p>
<p>They keep a favourite stone in a pouch of loose skin under the forearm and carry it between dives.</p>
<p>Researchers counted more than three thousand otters in the northern kelp forests last spring.</p>
</article><footer>Copyright 2024 Boilerplate Corp. All rights reserved. Cookie policy.</footer></body></html>"""

ROBOTS = b"User-agent: Parley\nDisallow: /private\nDisallow: /no-parley\n\nUser-agent: *\nDisallow: /only-others\n"
SLOW = threading.Event()


def redirect(to: str, status: int = 302) -> Reply:
    return Reply(status, headers={"Location": to})


def to_own_port(host: str, path: str):
    """A redirect to `host` on the test server's own port (known only once it serves)."""
    return lambda req: redirect(f"http://{host}:{req.headers['Host'].rsplit(':', 1)[1]}{path}")


def searxng(req) -> Reply:
    q, fmt = req.query.get("q", [""])[0], req.query.get("format", [""])[0]
    if fmt != "json" or q == "forbidden":
        return Reply(403, b"Forbidden", "text/plain")
    if q == "not json":
        return Reply(200, b"<html>results</html>")
    if q == "bad shape":
        return Reply(200, json.dumps({"results": {"url": "x"}}).encode(), "application/json")
    if q == "deep":
        return Reply(200, b'{"results": ' + b"[" * 100_000, "application/json")
    if q == "bad item":
        return Reply(200, json.dumps({"results": [{"title": "no url"}]}).encode(), "application/json")
    base = "http://" + req.headers["Host"]
    results = [{"title": "Otters", "url": f"{base}/article", "content": "Sea otters use stones."},
               {"title": "Gone", "url": f"{base}/missing", "content": "Otters hold hands while sleeping."},
               {"title": "Notes", "url": f"{base}/notes.md", "content": "notes"},
               {"title": "Fourth", "url": f"{base}/plain.txt", "content": "never reached with k=3"}]
    return Reply(200, json.dumps({"query": q, "results": results}).encode(), "application/json")


ROUTES = {
    "/robots.txt": Reply(200, ROBOTS, "text/plain"),
    "/article": Reply(200, ARTICLE.encode()),
    "/counted": Reply(200, ARTICLE.encode()),
    "/private/page": Reply(200, ARTICLE.encode()),
    "/no-parley": Reply(200, ARTICLE.encode()),
    "/only-others": Reply(200, ARTICLE.encode()),
    "/footer-only": Reply(200, b"<html><body><footer>Only a footer here</footer>"
                                b"<script>var hidden=1;</script></body></html>"),
    "/plain.txt": Reply(200, "Plain words, caf\u00e9 included.".encode(), "text/plain; charset=utf-8"),
    "/notes.md": Reply(200, b"# Notes\n\n* otters\n", "text/markdown"),
    "/data.json": Reply(200, b'{"otters": [1, 2]}', "application/json"),
    "/bad.json": Reply(200, b'{"otters": [1, 2', "application/json"),
    "/deep.json": Reply(200, b"[" * 100_000, "application/json"),  # json.loads recurses once per level
    "/latin1": Reply(200, "<html><body><p>Fran\u00e7ais na\u00eff</p></body></html>".encode("latin-1"),
                     "text/html; charset=iso-8859-1"),
    "/meta-charset": Reply(200, '<html><head><meta charset="windows-1252"></head><body><p>\u201cquoted\u201d</p>'
                           '</body></html>'.encode("cp1252"), "text/html"),
    "/image.png": Reply(200, b"\x89PNG\r\n\x1a\n" + bytes(100), "image/png"),
    "/broken": Reply(500, b"oops", "text/plain"),
    "/huge": lambda req: Reply(200, (b"x" * 65536 for _ in range(32)), "text/plain"),
    "/huge-declared": Reply(200, b"small", "text/plain", {"Content-Length": "50000000"}),
    "/slow": lambda req: (SLOW.wait(30), Reply(200, b"late", "text/plain"))[1],
    "/host": lambda req: Reply(200, req.headers["Host"].encode(), "text/plain"),
    "/redirect": redirect("/redirect2"),
    "/redirect2": redirect("/article", 301),
    "/loop": redirect("/loop"),
    "/nowhere": Reply(302),
    "/to-localhost": to_own_port("localhost", "/article"),
    "/to-v6-loopback": to_own_port("[::1]", "/article"),
    "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
    "/search": searxng,
}


@pytest.fixture(scope="module")
def site():
    with serve(ROUTES) as s:
        yield s
        SLOW.set()


def fetcher(tmp_path, **overrides) -> Fetcher:
    return Fetcher(WebConfig(**{"allow_private": True, "cache_dir": tmp_path / "cache", **overrides}))


# --- SSRF -----------------------------------------------------------------------------------


@pytest.mark.parametrize("address, refused", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.0.1", "private"),
    ("169.254.169.254", "link-local"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
    ("100.64.0.1", "not a public"), ("240.0.0.1", "reserved"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("fc00::1", "private"), ("ff02::1", "multicast"), ("::", "unspecified"), ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("8.8.8.8", None), ("2001:4860:4860::8888", None), ("::ffff:8.8.8.8", None), ("64:ff9b::808:808", None)])
def test_address_refusal_covers_ipv4_ipv6_and_embedded_ipv4(address, refused):
    why = address_refusal(address)
    assert (why is None) if refused is None else (refused in why)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/article", "http://localhost:{port}/article", "http://10.0.0.1/",
    "http://192.168.1.1/admin", "http://169.254.169.254/latest/meta-data/", "http://[::1]:{port}/article",
    "http://[::ffff:127.0.0.1]:{port}/article", "http://0.0.0.0:{port}/article"])
def test_private_addresses_are_refused_before_connecting(site, tmp_path, url):
    before = sum(site.hits.values())
    with pytest.raises(WebError, match="refusing to fetch .*allow_private"):
        fetcher(tmp_path, allow_private=False).fetch(url.format(port=site.base.rsplit(":", 1)[1]))
    assert sum(site.hits.values()) == before  # not even robots.txt was asked for


@pytest.mark.parametrize("path, target", [("/to-localhost", "localhost"), ("/to-v6-loopback", "::1"),
                                          ("/to-metadata", "169.254.169.254")])
def test_every_redirect_hop_is_vetted(site, tmp_path, path, target):
    # 127.0.0.1 is trusted by name, as a LAN host would be: the first hop passes the address
    # check for real; the hop it redirects to is a different host and must pass on its own.
    trusted = fetcher(tmp_path, allow_private=False, private_hosts=["127.0.0.1"])
    assert "Sea otters" in trusted.fetch(site.url("/article")).text
    before = site.hits["/article"]
    with pytest.raises(WebError, match=f"refusing to fetch .*{target}"):
        trusted.fetch(site.url(path))
    assert site.hits[path] >= 1 and site.hits["/article"] == before


def test_requests_go_to_the_vetted_address_with_the_real_host_name(site, tmp_path):
    # "localhost" may resolve to ::1 first, where nothing listens: the next address is tried.
    port = site.base.rsplit(":", 1)[1]
    page = fetcher(tmp_path).fetch(f"http://localhost:{port}/host")
    assert page.text == f"localhost:{port}"


def test_https_connects_to_the_vetted_address_but_checks_the_certificate_by_name(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key,
                    "-out", cert, "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    with serve({"/host": ROUTES["/host"]}, tls=(cert, key)) as tls_site:
        port = tls_site.base.rsplit(":", 1)[1]
        web = fetcher(tmp_path, ca_file=cert, obey_robots=False, cache_ttl=0)
        assert web.fetch(f"https://localhost:{port}/host").text == f"localhost:{port}"
        with pytest.raises(WebError, match="certificate verify failed"):  # the name, not the IP, is checked
            web.fetch(f"https://127.0.0.1:{port}/host")
        with pytest.raises(WebError, match="certificate verify failed"):  # and only trusted CAs are
            fetcher(tmp_path, obey_robots=False, cache_ttl=0).fetch(f"https://localhost:{port}/host")
    with pytest.raises(WebError, match="cannot load ca_file"):
        fetcher(tmp_path, ca_file=tmp_path / "missing.pem")


@pytest.mark.parametrize("url, message", [
    ("", "non-empty"), ("ftp://example.com/file", "only http"), ("example.com/x", "no scheme.*https://example.com/x"),
    ("http://exa mple.com/", "not a host name"), ("http://example.com:99999/", "port 99999"),
    ("http://user:secret@example.com/", "credentials"), ("http://[::1/", "malformed"), ("http:///path", "no host")])
def test_malformed_urls_are_refused_clearly(tmp_path, url, message):
    with pytest.raises(WebError, match=message):
        fetcher(tmp_path).fetch(url)


# --- robots.txt, redirects, status ----------------------------------------------------------


def test_robots_rules_for_our_agent_are_obeyed(site, tmp_path):
    web = fetcher(tmp_path)
    for path in ("/private/page", "/no-parley"):
        with pytest.raises(WebError, match=f"robots.txt of 127.0.0.1 disallows {path} for Parley"):
            web.fetch(site.url(path))
    assert "Sea otters" in web.fetch(site.url("/only-others")).text  # a rule for other agents only
    assert fetcher(tmp_path, obey_robots=False).fetch(site.url("/private/page")).status == 200


def test_robots_is_fetched_once_per_host(site, tmp_path):
    web, before = fetcher(tmp_path, cache_ttl=0), site.hits["/robots.txt"]
    web.fetch(site.url("/article"))
    web.fetch(site.url("/plain.txt"))
    assert site.hits["/robots.txt"] == before + 1


def test_missing_robots_allows_and_broken_robots_allows_with_a_note(tmp_path):
    page = Reply(200, b"hello", "text/plain")
    with serve({"/p": page}) as bare:
        assert fetcher(tmp_path).fetch(bare.url("/p")).notes == ()
    with serve({"/p": page, "/robots.txt": Reply(503, b"down", "text/plain")}) as down:
        notes = fetcher(tmp_path).fetch(down.url("/p")).notes
    assert any("robots.txt of 127.0.0.1 answered HTTP 503; treated as allowing" in n for n in notes)


def test_redirects_are_followed_up_to_a_limit(site, tmp_path):
    web = fetcher(tmp_path)
    page = web.fetch(site.url("/redirect#section"))
    assert page.url == site.url("/redirect") and page.final_url == site.url("/article")
    with pytest.raises(WebError, match="too many redirects"):
        web.fetch(site.url("/loop"))
    with pytest.raises(WebError, match="without saying where"):
        web.fetch(site.url("/nowhere"))


@pytest.mark.parametrize("path, status", [("/missing", "HTTP 404"), ("/broken", "HTTP 500")])
def test_http_errors_name_the_status(site, tmp_path, path, status):
    with pytest.raises(WebError, match=f"{path} returned {status}"):
        fetcher(tmp_path).fetch(site.url(path))


# --- limits ---------------------------------------------------------------------------------


def test_bodies_past_max_bytes_are_refused(site, tmp_path):
    web = fetcher(tmp_path, max_bytes=100_000)
    with pytest.raises(WebError, match="larger than the limit of 100,000 bytes.*stopped reading"):
        web.fetch(site.url("/huge"))
    with pytest.raises(WebError, match="declares 50,000,000"):
        web.fetch(site.url("/huge-declared"))


def test_a_server_that_does_not_answer_times_out(site, tmp_path):
    with pytest.raises(WebError, match=r"timed out after 0.5 s fetching http://127.0.0.1:\d+/slow"):
        fetcher(tmp_path, timeout=0.5).fetch(site.url("/slow"))
    SLOW.set()


def test_a_closed_port_is_a_clear_connection_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WebError, match=f"could not connect to http://127.0.0.1:{port}/page"):
        fetcher(tmp_path).fetch(f"http://127.0.0.1:{port}/page")


# --- content --------------------------------------------------------------------------------


def test_html_is_reduced_to_its_main_text(site, tmp_path):
    page = fetcher(tmp_path).fetch(site.url("/article"))
    assert (page.status, page.content_type, page.title) == (200, "text/html", "Otters of the Coast")
    assert "favourite stone" in page.text and "three thousand otters" in page.text
    for boilerplate in ("newsletter", "Shop the sale", "Cookie policy", "tracker"):
        assert boilerplate not in page.text
    assert page.size == len(ARTICLE.encode()) and not page.from_cache


def test_html_without_a_main_text_falls_back_to_plain_text(site, tmp_path):
    assert fetcher(tmp_path).fetch(site.url("/footer-only")).text == "Only a footer here"


@pytest.mark.parametrize("path, text", [
    ("/plain.txt", "Plain words, caf\u00e9 included."), ("/notes.md", "# Notes\n\n* otters\n"),
    ("/data.json", '{\n  "otters": [\n    1,\n    2\n  ]\n}'), ("/latin1", "Fran\u00e7ais na\u00eff"),
    ("/meta-charset", "\u201cquoted\u201d")])
def test_text_types_are_read_and_decoded(site, tmp_path, path, text):
    assert fetcher(tmp_path).fetch(site.url(path)).text == text


@pytest.mark.parametrize("path, message", [("/image.png", "returned image/png, which Parley cannot read"),
                                           ("/bad.json", "invalid JSON"), ("/deep.json", "invalid JSON")])
def test_unreadable_content_is_refused(site, tmp_path, path, message):
    with pytest.raises(WebError, match=message):
        fetcher(tmp_path).fetch(site.url(path))


# --- cache ----------------------------------------------------------------------------------


@pytest.fixture
def public_loopback(monkeypatch):
    """127.0.0.1 counts as a public address: the test server stands in for a public site, whose
    pages the shared cache keeps (it never keeps a page reached on a non-public address)."""
    real = web_module.address_refusal
    monkeypatch.setattr(web_module, "address_refusal", lambda a: None if a == "127.0.0.1" else real(a))


def test_a_cached_page_is_served_without_the_network(site, tmp_path, public_loopback):
    before = site.hits["/counted"]
    first = fetcher(tmp_path).fetch(site.url("/counted"))
    again = fetcher(tmp_path).fetch(site.url("/counted"))  # a new fetcher: the cache is on disk
    assert site.hits["/counted"] == before + 1
    assert again.from_cache and not first.from_cache
    assert {**vars(again), "from_cache": False} == vars(first)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".json"]  # no temp files left


def test_cache_ttl_zero_turns_the_cache_off(site, tmp_path):
    before = site.hits["/counted"]
    web = fetcher(tmp_path, cache_ttl=0)
    assert not web.fetch(site.url("/counted")).from_cache and not web.fetch(site.url("/counted")).from_cache
    assert site.hits["/counted"] == before + 2 and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("garbage", ["", "{not json", '{"url": 5}', "[1, 2]", "\udcff"])
def test_a_corrupt_cache_file_is_ignored_and_replaced(site, tmp_path, garbage, public_loopback):
    web = fetcher(tmp_path)
    web.fetch(site.url("/counted"))
    (path,) = (tmp_path / "cache").iterdir()
    path.write_bytes(garbage.encode("utf-8", "surrogateescape"))
    before = site.hits["/counted"]
    assert not web.fetch(site.url("/counted")).from_cache and site.hits["/counted"] == before + 1
    assert web.fetch(site.url("/counted")).from_cache


def test_a_private_fetch_is_never_written_to_the_shared_cache(site, tmp_path):
    """Issue 15, finding 3: a page a trusted fetcher reached on a private address (allow_private)
    is not in the cache for a later fetcher, with or without private access."""
    before = site.hits["/counted"]
    trusted = fetcher(tmp_path)  # allow_private, as a local `parley chat` may run
    assert not trusted.fetch(site.url("/counted")).from_cache
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(WebError, match="refusing to fetch"):  # a server's fetcher, for any user
        fetcher(tmp_path, allow_private=False).fetch(site.url("/counted"))
    assert not fetcher(tmp_path).fetch(site.url("/counted")).from_cache  # fetched again, not shared
    assert site.hits["/counted"] == before + 2


def test_the_address_rules_are_checked_before_a_cached_page_is_served(site, tmp_path, monkeypatch):
    """A page cached while its host was public is not served once the host is one the
    fetcher's rules refuse (here: 127.0.0.1 stops counting as public)."""
    real = web_module.address_refusal
    monkeypatch.setattr(web_module, "address_refusal", lambda a: None if a == "127.0.0.1" else real(a))
    assert not fetcher(tmp_path, allow_private=False).fetch(site.url("/counted")).from_cache
    assert fetcher(tmp_path, allow_private=False).fetch(site.url("/counted")).from_cache
    monkeypatch.setattr(web_module, "address_refusal", real)
    with pytest.raises(WebError, match="refusing to fetch"):
        fetcher(tmp_path, allow_private=False).fetch(site.url("/counted"))
    assert fetcher(tmp_path).fetch(site.url("/counted")).from_cache  # allowed here, so served


def test_a_cache_file_from_before_the_scoped_keys_is_never_served(site, tmp_path):
    """A file the old cache wrote (named by the URL alone, maybe a private page) is not found."""
    import hashlib

    url = site.url("/counted")
    trusted = fetcher(tmp_path, cache_ttl=0)
    page = trusted.fetch(url)
    (tmp_path / "cache").mkdir()
    old = {k: v for k, v in vars(page).items() if k in web_module.CACHE_FIELDS}
    old.update(text="SECRET from the LAN", notes=[])
    (tmp_path / "cache" / f"{hashlib.sha256(url.encode()).hexdigest()}.json").write_text(json.dumps(old))
    again = fetcher(tmp_path).fetch(url)
    assert not again.from_cache and "SECRET" not in again.text


# --- search ---------------------------------------------------------------------------------


def test_searxng_results_are_parsed(site):
    hits = SearxngSearch(site.base + "/").search("sea otters", k=2)
    assert [h.title for h in hits] == ["Otters", "Gone"]
    assert hits[0].url == site.url("/article") and hits[0].snippet == "Sea otters use stones."
    assert site.requests[-1].query == {"q": ["sea otters"], "format": ["json"]}


@pytest.mark.parametrize("query, k, message", [
    ("", 3, "non-empty"), ("otters", 0, "from 1 to 50"), ("forbidden", 3, "HTTP 403.*settings.yml"),
    ("not json", 3, "JSON object with a 'results' list"), ("deep", 3, "JSON object with a 'results' list"),
    ("bad shape", 3, "not a list"),
    ("bad item", 3, "malformed result #1")])
def test_searxng_problems_are_clear_errors(site, query, k, message):
    with pytest.raises(WebError, match=message):
        SearxngSearch(site.base).search(query, k)


def test_an_unreachable_searxng_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WebError, match=f"could not reach SearXNG at http://127.0.0.1:{port}"):
        SearxngSearch(f"http://127.0.0.1:{port}").search("otters")


# --- the stage ------------------------------------------------------------------------------


class Given(Stage):
    """Stands in for NLU: adds the given frames ahead of the text, as NLU does."""

    name = "given"

    def __init__(self, *frames: Frame):
        self.frames = frames

    def process(self, frame: Frame, turn: Turn) -> Iterator[Frame]:
        yield from self.frames
        yield frame


def run(stage: WebStage, text: str, *given: Frame) -> tuple[list[Frame], Turn]:
    turn = Turn(user_id=1)
    return Pipeline([Given(*given), stage])(turn, text), turn


def test_a_url_slot_becomes_a_web_passage(site, tmp_path):
    url = site.url("/article")
    out, turn = run(WebStage(fetcher(tmp_path)), "what does that page say?", Slots({"url": url}))
    passages = out[1]
    assert isinstance(passages, Passages) and passages.origin == "web"
    assert out[2] == UserText("what does that page say?")  # after the passages, so respond has them
    (item,) = passages.items
    assert (item.n, item.source, item.location) == (1, url, "page") and "favourite stone" in item.text
    entry = turn.trace["web"]
    assert entry.decision == "fetched" and entry.evidence["url"] == url and entry.evidence["status"] == 200
    assert {"bytes", "from_cache", "ms"} <= entry.evidence.keys()


def test_a_url_carried_over_from_an_earlier_turn_is_not_fetched_again(site, tmp_path):
    before = site.hits["/counted"]
    this_turn, carried = Slots({"topic": "otters"}), Slots({"topic": "otters", "url": site.url("/counted")})
    out, turn = run(WebStage(fetcher(tmp_path)), "thanks!", this_turn, carried)
    assert not any(isinstance(f, Passages) for f in out) and turn.trace["web"].decision == "no url"
    assert site.hits["/counted"] == before


def test_a_url_in_the_text_is_found_and_long_text_truncated(site, tmp_path):
    out, _ = run(WebStage(fetcher(tmp_path), max_chars=60), f"summarise {site.url('/article')}, please")
    (item,) = out[0].items
    assert item.source == site.url("/article") and len(item.text) <= 60 and item.text.endswith("\u2026")


def test_a_failed_fetch_is_the_answer(site, tmp_path):
    out, turn = run(WebStage(fetcher(tmp_path)), "read this", Slots({"url": site.url("/missing")}))
    assert isinstance(out[1], Notice) and out[1].text.startswith("Could not fetch URL: ") and "404" in out[1].text
    # the text is not passed on: nothing downstream makes up a summary of a page it never saw
    assert UserText("read this") not in out and turn.trace["web"].decision == "fetch failed"


def test_web_lookup_searches_and_fetches_the_top_results(site, tmp_path):
    stage = WebStage(fetcher(tmp_path), SearxngSearch(site.base))
    out, turn = run(stage, "tell me about sea otters", Intent("web_lookup", 0.9))
    items = out[1].items
    assert [(i.n, i.location) for i in items] == [(1, "page"), (2, "search snippet"), (3, "page")]
    assert items[1].text == "Otters hold hands while sleeping." and items[2].source == site.url("/notes.md")
    assert turn.trace["web"].decision == "searched" and turn.trace["web"].evidence["results"] == 3
    assert turn.trace["web"].evidence["query"] == "tell me about sea otters"  # no query slot: the whole text
    out, turn = run(stage, "search the web for sea otters", Intent("web_lookup", 0.9), Slots({"query": "sea otters"}))
    assert turn.trace["web"].evidence["query"] == "sea otters"  # NLU's query slot


def test_without_url_or_search_backend_the_stage_passes(site, tmp_path):
    out, turn = run(WebStage(fetcher(tmp_path)), "look up otters", Intent("web_lookup", 0.9))
    assert out == [Intent("web_lookup", 0.9), UserText("look up otters")]
    assert turn.trace["web"].decision == "no search backend"
    out, turn = run(WebStage(fetcher(tmp_path)), "hello there")
    assert out == [UserText("hello there")] and turn.trace["web"].decision == "no url"


@pytest.mark.parametrize("text, url", [
    ("see https://example.com/a?b=1.", "https://example.com/a?b=1"),
    ("(https://en.wikipedia.org/wiki/Otter_(film))", "https://en.wikipedia.org/wiki/Otter_(film)"),
    ("what's on example.com/news today?", "https://example.com/news"),
    ("try docs.python.org", "https://docs.python.org"),
    ("mail bob@example.com", None), ("open config.py and notes.txt", None), ("e.g. this", None)])
def test_find_url(text, url):
    assert find_url(text) == url


def test_config_defaults_and_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    assert Fetcher().cache_dir == tmp_path / "home" / "cache" / "web"
    for bad, message in [({"timeout": 0}, "timeout"), ({"max_bytes": -1}, "max_bytes"),
                         ({"cache_ttl": -5}, "cache_ttl"), ({"user_agent": " "}, "user_agent")]:
        with pytest.raises(WebError, match=message):
            WebConfig(**bad)
    with pytest.raises(WebError, match="max_chars"):
        WebStage(fetcher(tmp_path), max_chars=0)
