"""Web access: fetch a page safely, keep its readable text, cache it; search via SearXNG.

    fetcher = Fetcher(WebConfig(timeout=5))
    page = fetcher.fetch("https://example.com/article")   # Page(title=..., text=..., from_cache=...)
    search = SearxngSearch("http://localhost:8888")
    hits = search.search("sea otter tools", k=3)           # [SearchResult(title, url, snippet)]
    pipeline = Pipeline([..., WebStage(fetcher, search), ...])

A URL typed into a chat can point anywhere, so `Fetcher` treats it as hostile (SSRF):

* Only http(s) URLs with a plain host name or IP literal are accepted.
* Redirects are followed by hand, at most 5, and every hop is checked like the first.
* Each hop's host is resolved (getaddrinfo) and EVERY address must be public: loopback,
  private, link-local, multicast, reserved, unspecified and shared (CGNAT) addresses are
  refused, IPv4 and IPv6, including IPv4 inside IPv6 (::ffff:a.b.c.d, 6to4, NAT64).
  `allow_private` turns this off; `private_hosts` exempts named hosts (a LAN wiki).
* The request is sent to the vetted IP itself (the URL's host is replaced by it; the Host
  header, TLS SNI and certificate check keep the real name), so a DNS answer that changes
  between check and connect (DNS rebinding) cannot move the connection elsewhere.
* Connections are never reused (a pooled TLS connection to an IP shared by two names would
  carry the second name's request under the first name's certificate), and proxies from
  the environment are ignored (a proxy would resolve names itself, unchecked).

Residual risk, honestly: we vet where we connect, not what the server does there. A public
host can relay to its own network (an open proxy); a host in `private_hosts` is trusted by
name, whatever it resolves to; `allow_private=True` trusts every address.

The page cache is shared (one folder per PARLEY_HOME, for `parley chat` and `parley serve`
alike), so it holds public pages only: a page that any hop reached on a non-public address
(allowed by `allow_private` or `private_hosts`) is never written to it. Its files are keyed
by the URL and that scope, and before a cached page is served, its URL's host and its final
URL's host are resolved and checked against this fetcher's rules, as a fetch would be.

robots.txt is honoured for our user agent (its first word, "Parley"): a missing file (4xx)
allows everything; a 5xx or unreachable one is treated as allowing and noted in
`Page.notes`. Bodies are streamed and cut off at `max_bytes` (Content-Length is not
trusted); HTML is reduced to its main text by trafilatura (lxml's plain text if that finds
nothing). Pages are cached on disk as JSON named by the URL's sha256, written atomically;
a corrupt cache file is ignored and replaced.

`WebStage` brings a page into the turn: this turn's `url` slot (not one carried over from
an earlier turn), or else a URL in the text, is fetched into `Passages(origin="web")`; a
`web_lookup` intent without a URL searches and fetches the top hits. Like every stage that
adds frames, it emits them before passing the `UserText` on, so later stages (respond)
find them when the text arrives. Failures become a `Notice`; the turn goes on.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin
from urllib.robotparser import RobotFileParser

import httpx
import trafilatura
from charset_normalizer import from_bytes

from parley.config import setting
from parley.files import NotRegularFile, atomic_open, read_regular
from parley.pipeline.frames import Frame, Intent, Notice, Passage, Passages, Slots, UserText
from parley.pipeline.readers import shallow_html
from parley.pipeline.runner import Stage, Turn
from parley.pipeline.urls import find_url

MAX_REDIRECTS = 5
REDIRECTS = {301, 302, 303, 307, 308}
ROBOTS_MAX_BYTES = 512 * 1024
ROBOTS_TTL = 3600.0  # seconds a host's robots.txt rules are kept in memory
READABLE = {"text/html", "application/xhtml+xml", "text/plain", "text/markdown", "text/x-markdown",
            "application/json"}
ACCEPT = "text/html,application/xhtml+xml,text/plain,text/markdown,application/json;q=0.9,*/*;q=0.1"
NAT64 = ipaddress.ip_network("64:ff9b::/96")
HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?", re.I)


class WebError(ValueError):
    """A URL Parley will not or could not fetch, or a search that failed: the message says why."""


@dataclass
class WebConfig:
    timeout: float = setting(10.0, "seconds allowed per request (connect, each read, and the whole body)")
    max_bytes: int = setting(2_000_000, "largest body read, after decompression; larger pages are refused")
    user_agent: str = setting("Parley/0.1 (+local assistant)", "User-Agent; its first word is our robots.txt name")
    allow_private: bool = setting(False, "allow hosts that resolve to loopback, LAN or other non-public addresses")
    private_hosts: list[str] = setting(help="host names allowed to be non-public anyway (a LAN wiki)", factory=list)
    cache_dir: Path | None = setting(None, "page cache folder (default: $PARLEY_HOME/cache/web)")
    cache_ttl: float = setting(3600.0, "seconds a cached page stays fresh; 0 turns the cache off")
    obey_robots: bool = setting(True, "refuse pages that the site's robots.txt disallows for our user agent")
    ca_file: Path | None = setting(None, "extra CA certificates (PEM) to trust, e.g. a LAN server's own CA")

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise WebError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise WebError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")
        if not self.cache_ttl >= 0:
            raise WebError(f"cache_ttl must be >= 0 seconds (0 turns the cache off), got {self.cache_ttl!r}")
        if not self.user_agent.strip():
            raise WebError("user_agent must not be empty: sites and robots.txt rules need a name")


@dataclass(frozen=True)
class Page:
    url: str  # as requested (normalised: no #fragment)
    final_url: str  # after redirects
    status: int
    content_type: str  # media type only, e.g. "text/html"
    title: str
    text: str
    fetched_at: float  # unix time of the network fetch
    from_cache: bool = False
    size: int = 0  # bytes of body read
    notes: tuple[str, ...] = ()  # things worth knowing that were not errors (robots.txt unreachable ...)


CACHE_FIELDS = {"url": str, "final_url": str, "status": int, "content_type": str, "title": str, "text": str,
                "fetched_at": (int, float), "size": int, "notes": list}


def parse_url(url: str) -> httpx.URL:
    """`url` checked to be a well-formed http(s) URL, without its #fragment."""
    if not isinstance(url, str) or not url.strip():
        raise WebError(f"a URL must be non-empty text like https://example.com/page, got {url!r}")
    if len(url) > 4096:
        raise WebError(f"URL too long ({len(url)} characters; at most 4096)")
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL as e:
        raise WebError(f"malformed URL {url!r}: {e}") from e
    if not parsed.scheme:
        raise WebError(f"URL {url!r} has no scheme: write it as https://{url.lstrip('/')}")
    if parsed.scheme not in ("http", "https"):
        raise WebError(f"cannot fetch {url!r}: only http:// and https:// URLs are supported")
    host = parsed.raw_host.decode("ascii")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise WebError(f"malformed URL {url!r}: {host!r} is not an IPv6 address") from e
    elif not HOST_NAME.fullmatch(host):
        raise WebError(f"malformed URL {url!r}: {host or 'no host'!r} is not a host name")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise WebError(f"malformed URL {url!r}: port {parsed.port} is out of range (1-65535)")
    if parsed.userinfo:
        raise WebError(f"URL {url!r} carries a user name or password: Parley does not send credentials")
    return parsed.copy_with(fragment=None)


def address_refusal(address: str) -> str | None:
    """Why Parley will not connect to this IP address, or None when it is a public one."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        nat64 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in NAT64 else None
        inner = ip.ipv4_mapped or ip.sixtofour or nat64
        if inner is not None:
            why = address_refusal(str(inner))
            return f"{why} (inside the IPv6 address {ip})" if why else None
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return None if ip.is_global else "not a public address"


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise WebError(f"could not resolve the host {host!r} ({e}): check the address and your network") from e
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Fetcher:
    """Fetches pages under the rules in the module docstring. Not shared across threads."""

    def __init__(self, config: WebConfig | None = None):
        self.config = config or WebConfig()
        self.cache_dir = Path(self.config.cache_dir) if self.config.cache_dir else _default_cache_dir()
        self.agent = self.config.user_agent.split("/")[0].split()[0]
        self._private_hosts = {h.lower().strip("[]") for h in self.config.private_hosts}
        self._robots: dict[str, tuple[RobotFileParser, float, str]] = {}  # origin -> (rules, when, note)
        self._client = httpx.Client(timeout=self.config.timeout, follow_redirects=False, trust_env=False,
                                    limits=httpx.Limits(max_keepalive_connections=0), verify=self._tls())

    def _tls(self) -> ssl.SSLContext:
        context = httpx.create_ssl_context()  # certifi's CAs, as httpx uses by default
        if self.config.ca_file:
            try:  # read here, not by OpenSSL: a FIFO would block its open, a device never end
                data = read_regular(self.config.ca_file)
                # PEM is ASCII text (what lies outside its blocks does not matter); anything else is DER
                context.load_verify_locations(cadata=data.decode("ascii", "ignore") if b"-----BEGIN" in data else data)
            except NotRegularFile:
                raise WebError(f"cannot load ca_file {self.config.ca_file}: not a regular file (a folder, pipe or "
                               "device); give a PEM file of CA certificates") from None
            except (OSError, ssl.SSLError, ValueError) as e:
                raise WebError(f"cannot load ca_file {self.config.ca_file}: {e}; give a PEM file of CA "
                               f"certificates") from e
        return context

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str) -> Page:
        target = parse_url(url)
        key = str(target)
        cached = self._cache_read(key)
        if cached is not None:  # checked as a fetch would be: the rules may differ from the writer's
            for url in {target, parse_url(cached.final_url)}:
                self._vet(url)
            return cached
        notes: list[str] = []
        private: set[str] = set()  # hosts reached on non-public addresses: the page stays out of the cache
        with self._follow(target, notes, private) as (final, response):
            status = response.status_code
            if status >= 300:
                raise WebError(f"{final} returned HTTP {status} {response.reason_phrase}".rstrip())
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind not in READABLE and not kind.endswith("+json"):
                raise WebError(f"{final} returned {kind or 'no content type'}, which Parley cannot read")
            body = self._read(response, final, self.config.max_bytes)
            text = _decode(body, response.charset_encoding, kind)
        title, text = _readable(text, kind, final)
        page = Page(key, str(final), status, kind, title, text, time.time(), size=len(body), notes=tuple(notes))
        return page if private else self._cache_write(page)

    # --- requests ---------------------------------------------------------------------------

    @contextmanager
    def _follow(self, url: httpx.URL, notes: list[str] | None,
                private: set[str] | None = None) -> Iterator[tuple[httpx.URL, httpx.Response]]:
        """The first non-redirect response from `url`, each hop vetted (and checked against
        robots.txt unless `notes` is None, as when fetching robots.txt itself); the hosts a hop
        reached on a non-public address are added to `private`."""
        for _ in range(MAX_REDIRECTS + 1):
            if notes is not None and self.config.obey_robots:
                self._check_robots(url, notes)
            with self._open(url, private) as response:
                if response.status_code not in REDIRECTS:
                    yield url, response
                    return
                location = response.headers.get("location")
            if not location:
                raise WebError(f"{url} redirected (HTTP {response.status_code}) without saying where to")
            url = parse_url(urljoin(str(url), location))
        raise WebError(f"too many redirects (more than {MAX_REDIRECTS}) before reaching {url}")

    def _vet(self, url: httpx.URL) -> tuple[list[str], bool]:
        """The addresses of `url`'s host, and whether any is non-public (then allowed only by
        `allow_private` or `private_hosts`); WebError if the rules refuse them."""
        host = url.raw_host.decode("ascii")
        addresses = resolve(host, url.port or (443 if url.scheme == "https" else 80))
        if not addresses:
            raise WebError(f"the host {host!r} has no addresses: check the URL {url}")
        refusals = [(address, why) for address in addresses if (why := address_refusal(address))]
        exempt = self.config.allow_private or host.lower() in self._private_hosts or \
            url.host.lower() in self._private_hosts
        if refusals and not exempt:
            address, why = refusals[0]
            raise WebError(f"refusing to fetch {url}: {host} is {address}, {why} (set allow_private, "
                           f"or list the host in private_hosts, to reach your own network)")
        return addresses, bool(refusals)

    @contextmanager
    def _open(self, url: httpx.URL, private: set[str] | None = None) -> Iterator[httpx.Response]:
        """A streamed response from a vetted address of `url`'s host; httpx errors made clear."""
        host = url.raw_host.decode("ascii")
        addresses, non_public = self._vet(url)
        if non_public and private is not None:
            private.add(host)
        headers = {"Host": url.netloc.decode("ascii"), "User-Agent": self.config.user_agent, "Accept": ACCEPT}
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        try:
            for i, address in enumerate(addresses):  # the first that accepts a connection
                request = self._client.build_request("GET", url.copy_with(host=address), headers=headers,
                                                     extensions=extensions)
                try:
                    response = self._client.send(request, stream=True)
                    break
                except httpx.ConnectError:
                    if i == len(addresses) - 1:
                        raise
            try:
                yield response
            finally:
                response.close()
        except httpx.TimeoutException as e:
            raise WebError(f"timed out after {self.config.timeout:g} s fetching {url}") from e
        except httpx.ConnectError as e:
            raise WebError(f"could not connect to {url}: {e or 'connection failed'}") from e
        except httpx.HTTPError as e:
            raise WebError(f"fetching {url} failed: {e or type(e).__name__}") from e

    def _read(self, response: httpx.Response, url: httpx.URL, limit: int) -> bytes:
        """The body, refused past `limit` bytes or past the timeout (a trickling server)."""
        too_big = f"{url} is larger than the limit of {limit:,} bytes (max_bytes)"
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise WebError(f"{too_big}: it declares {int(declared):,}")
        deadline = time.monotonic() + self.config.timeout
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                raise WebError(f"{too_big}: stopped reading there")
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("body too slow", request=response.request)
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_robots(self, url: httpx.URL, notes: list[str]) -> None:
        origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        entry = self._robots.get(origin)
        if entry is None or time.time() - entry[1] > ROBOTS_TTL:
            entry = self._robots[origin] = self._load_robots(url)
        rules, _, note = entry
        if note and note not in notes:
            notes.append(note)
        if not rules.can_fetch(self.config.user_agent, str(url)):
            raise WebError(f"robots.txt of {url.host} disallows {url.path} for {self.agent}")

    def _load_robots(self, url: httpx.URL) -> tuple[RobotFileParser, float, str]:
        rules, note = RobotFileParser(), ""
        try:
            with self._follow(url.copy_with(path="/robots.txt", query=None), None) as (final, response):
                if response.status_code >= 500:
                    note = f"robots.txt of {url.host} answered HTTP {response.status_code}; treated as allowing"
                if response.status_code >= 300:
                    rules.allow_all = True
                else:
                    body = self._read(response, final, ROBOTS_MAX_BYTES)
                    rules.parse(body.decode("utf-8", "replace").splitlines())
        except WebError as e:
            rules.allow_all = True
            note = f"robots.txt of {url.host} unreadable ({e}); treated as allowing"
        return rules, time.time(), note

    # --- cache ------------------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path:
        # keyed by what the fetch was allowed to reach too: only public pages are written, and a
        # file written before that rule (which may hold a private page) is never found
        return self.cache_dir / f"{hashlib.sha256(f'public {key}'.encode()).hexdigest()}.json"

    def _cache_read(self, key: str) -> Page | None:
        """A fresh cached page for `key`, or None (absent, stale, or corrupt: refetched and replaced)."""
        if self.config.cache_ttl <= 0:
            return None
        try:
            data = json.loads(self._cache_path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (not isinstance(data, dict) or data.keys() != CACHE_FIELDS.keys() or data["url"] != key
                or not all(isinstance(data[k], t) for k, t in CACHE_FIELDS.items())
                or not all(isinstance(n, str) for n in data["notes"])):
            return None
        if time.time() - data["fetched_at"] > self.config.cache_ttl:
            return None
        return Page(**{**data, "notes": tuple(data["notes"])}, from_cache=True)

    def _cache_write(self, page: Page) -> Page:
        if self.config.cache_ttl <= 0:
            return page
        data = {k: v for k, v in asdict(page).items() if k in CACHE_FIELDS}
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            with atomic_open(self._cache_path(page.url)) as f:
                json.dump(data, f, ensure_ascii=False)
        except OSError as e:  # the page is good; only its reuse is lost
            return replace(page, notes=(*page.notes, f"not cached: {e}"))
        return page


def _default_cache_dir() -> Path:
    from parley.registry import parley_home  # imports torch: paid only when no cache_dir is given

    return parley_home() / "cache" / "web"


def _decode(body: bytes, declared: str | None, kind: str) -> str:
    """Text from the declared charset, else an HTML <meta charset>, else UTF-8, else detected."""
    if declared is None and kind in ("text/html", "application/xhtml+xml"):
        meta = re.search(rb"""<meta[^>]+charset=["']?([\w.:-]+)""", body[:4096], re.I)
        declared = meta.group(1).decode("ascii") if meta else None
    for charset in (declared, "utf-8"):
        if charset:
            try:
                return body.decode(charset)
            except (LookupError, UnicodeDecodeError):
                pass
    best = from_bytes(body).best()
    return str(best) if best is not None else body.decode("latin-1")


def _readable(text: str, kind: str, url: httpx.URL) -> tuple[str, str]:
    """(title, main text) of a decoded body of media type `kind`."""
    if kind.endswith("json"):
        try:
            return "", json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except (ValueError, RecursionError) as e:  # the parser recurses once per level: "[" * 100000
            raise WebError(f"{url} returned invalid JSON: {e}") from e
    if kind not in ("text/html", "application/xhtml+xml"):
        return "", text
    html = re.sub(r"^\s*<\?xml[^>]*\?>", "", text)  # lxml refuses str with an encoding declaration
    data, doc = shallow_html(html.encode())  # nested too deep for lxml, it would read as empty (readers.py)
    if doc is None:  # empty or hopeless markup: nothing to read
        return "", ""
    html = data.decode()
    title = " ".join((doc.findtext(".//title") or "").split())
    main = trafilatura.extract(html, include_comments=False, include_tables=True) or ""
    if not main.strip():
        for junk in doc.xpath("//script | //style | //noscript | //template"):
            junk.drop_tree()
        main = "\n".join(line.strip() for line in doc.text_content().splitlines() if line.strip())
    return title, main


# --- search ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchResult:
    title: str
    url: str
    snippet: str


class SearchBackend(Protocol):
    def search(self, query: str, k: int = 5) -> list[SearchResult]: ...


class SearxngSearch:
    """A SearXNG instance's JSON API (`GET {base}/search?q=...&format=json`). The instance is
    one the user configured, often on localhost, so it is trusted: no SSRF checks here."""

    def __init__(self, base_url: str, timeout: float = 10.0, user_agent: str = "Parley/0.1 (+local assistant)"):
        self.base = str(parse_url(base_url)).rstrip("/")
        if not timeout > 0:
            raise WebError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self._client = httpx.Client(timeout=timeout, trust_env=False,
                                    headers={"User-Agent": user_agent, "Accept": "application/json"})

    def close(self) -> None:
        self._client.close()

    def search(self, query: str, k: int = 5) -> list[SearchResult]:
        if not isinstance(query, str) or not query.strip():
            raise WebError(f"a search query must be non-empty text, got {query!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 50:
            raise WebError(f"k (number of results) must be an integer from 1 to 50, got {k!r}")
        where = f"SearXNG at {self.base}"
        try:
            response = self._client.get(f"{self.base}/search", params={"q": query, "format": "json"})
        except httpx.HTTPError as e:
            raise WebError(f"could not reach {where}: {e or type(e).__name__}") from e
        if response.status_code == 403:
            raise WebError(f"{where} refused format=json (HTTP 403): add json to search.formats in its settings.yml")
        if response.status_code != 200:
            raise WebError(f"{where} returned HTTP {response.status_code}")
        try:
            results = response.json()["results"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise WebError(f"{where} did not return a JSON object with a 'results' list") from e
        if not isinstance(results, list):
            raise WebError(f"{where} returned 'results' that is not a list")
        hits = []
        for i, item in enumerate(results[:k]):
            item = item if isinstance(item, dict) else {}
            title, url, snippet = item.get("title") or "", item.get("url"), item.get("content") or ""
            if not (isinstance(url, str) and url.startswith(("http://", "https://"))
                    and isinstance(title, str) and isinstance(snippet, str)):
                raise WebError(f"{where} returned a malformed result #{i + 1} (needs an http(s) 'url' and text "
                               f"'title'/'content'): {str(results[i])[:200]}")
            hits.append(SearchResult(title or url, url, snippet))
        return hits


# --- the pipeline stage ---------------------------------------------------------------------

class WebStage(Stage):
    """Fetches the page a turn points at (or searches, for a web_lookup) into web Passages."""

    name = "web"

    def __init__(self, fetcher: Fetcher | None = None, search: SearchBackend | None = None,
                 max_chars: int = 4000, max_results: int = 3):
        if max_chars <= 0 or not 1 <= max_results <= 10:
            raise WebError(f"max_chars must be > 0 and max_results 1-10, got {max_chars} and {max_results}")
        self.fetcher = fetcher or Fetcher()
        self.search = search
        self.max_chars = max_chars
        self.max_results = max_results

    def process(self, frame: Frame, turn: Turn) -> Iterator[Frame]:
        if isinstance(frame, UserText):
            fetched = yield from self._lookup(frame.text, turn)
            if fetched is False:
                return  # the message was about a page we could not read: the notice is the answer
        yield frame

    def _lookup(self, text: str, turn: Turn) -> Iterator[Frame]:
        """Yield the web frames for the turn; return False when the page the user pointed at
        could not be fetched (answering without it would invite a made-up summary)."""
        # This turn's slots are the first Slots frame (NLU's); a later one (state's) adds values
        # carried over from earlier turns, and an old URL must not be fetched again every turn.
        slots = turn.all(Slots)
        url = str(slots[0].values.get("url") or "") if slots else ""
        url = url or find_url(text)
        if url:
            url = url if "://" in url else "https://" + url  # a slot may hold a bare domain
            try:
                page, info = self._fetch(url)
            except WebError as e:
                turn.note(self.name, "fetch failed", url=url, error=str(e))
                yield Notice(f"Could not fetch URL: {e}")
                return False
            turn.note(self.name, "fetched", **info)
            yield Passages((self._passage(1, page.final_url, "page", page.text),), origin="web")
            return
        intent = turn.get(Intent)
        if intent is None or intent.name != "web_lookup":
            turn.note(self.name, "no url")
            return
        if self.search is None:
            turn.note(self.name, "no search backend", query=text)
            return
        # NLU's `query` slot ("search the web for X" -> "X") makes a better query than the whole message
        query = str(slots[0].values.get("query") or "").strip() if slots else ""
        query = query or text
        try:
            hits = self.search.search(query, self.max_results)
        except WebError as e:
            turn.note(self.name, "search failed", query=query, error=str(e))
            yield Notice(f"Could not search the web: {e}")
            return
        items, pages = [], []
        for hit in hits:
            try:
                page, info = self._fetch(hit.url)
                items.append(self._passage(len(items) + 1, page.final_url, "page", page.text))
            except WebError as e:  # the search engine's snippet is better than nothing
                info = {"url": hit.url, "error": str(e)}
                if hit.snippet.strip():
                    items.append(self._passage(len(items) + 1, hit.url, "search snippet", hit.snippet))
            pages.append(info)
        turn.note(self.name, "searched" if items else "search found nothing", query=query, results=len(hits),
                  pages=pages)
        if items:
            yield Passages(tuple(items), origin="web")
        else:
            yield Notice(f"Could not find anything on the web for: {query}")

    def _fetch(self, url: str) -> tuple[Page, dict]:
        start = time.perf_counter()
        page = self.fetcher.fetch(url)
        if not page.text.strip():
            raise WebError(f"{page.final_url} has no readable text")
        info = {"url": page.final_url, "status": page.status, "bytes": page.size, "from_cache": page.from_cache,
                "ms": round((time.perf_counter() - start) * 1000, 1)}
        if page.notes:
            info["notes"] = list(page.notes)
        return page, info

    def _passage(self, n: int, source: str, location: str, text: str) -> Passage:
        text = text.strip()
        if len(text) > self.max_chars:
            text = text[: self.max_chars - 1].rstrip() + "…"
        return Passage(n=n, source=source, location=location, text=text)
