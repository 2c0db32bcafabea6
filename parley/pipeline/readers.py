"""Files as plain text, and plain text as overlapping chunks: the first half of ingestion.

    mime, sections = read_file(Path("manual.pdf"))   # one Section per page (page=None for text)
    chunks = chunk_sections(sections, words=200, overlap=40)
    chunks[3].text, chunks[3].ord, chunks[3].page

Readers: `.txt` (UTF-8, or UTF-16 or UTF-32 with a byte-order mark), `.md` (markup stripped, headings
kept as their own paragraphs), `.html`/`.htm` (the page's main landmark, <main> or
role="main", where it has one, else the main text as trafilatura finds it; walked block by
block so paragraphs, list items, table rows and code stay apart, lists that are nearly all
links left out; plain lxml text when neither finds any; one section per heading, which knows
its heading path, page title first; past MAX_DEPTH nested elements only their text is kept)
and `.pdf` (pypdf, text per page). Anything else, binary content (NUL bytes), text that is
not UTF-8, a PDF without a text layer, a file over the size limit or one with no text is
refused with a `ReadError` that names the file and says what to do.

Chunking packs sentences into chunks of at most `words` words, closing a chunk at a
paragraph end once it holds three quarters of that, and starts each chunk with the last
`overlap` words (whole sentences where they fit) of the one before, so a fact cut at a
boundary is whole in one of the two. The default of 200 words is about 260 word pieces of
plain prose, near the 256 the MiniLM encoder reads (text with code runs longer, and its end is
not embedded, though BM25 still indexes it). A chunk starts with its section's heading path on
a line of its own, so it says what it is about wherever it sits in a long page; a heading starts
a new chunk (without overlap) unless the one being filled holds under a quarter of its words.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import io
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import lxml.html
import pypdf
from pypdf.errors import PyPdfError
import trafilatura
from lxml import etree

from parley.files import NotRegularFile, TooLarge, read_regular

MIME = {".txt": "text/plain", ".md": "text/markdown", ".markdown": "text/markdown", ".html": "text/html",
        ".htm": "text/html", ".pdf": "application/pdf"}
DEFAULT_MAX_BYTES = 20_000_000


class ReadError(ValueError):
    """A file that cannot be turned into text, with the reason and the fix."""


@dataclass(frozen=True)
class Section:
    """A run of text from a document, the PDF page it is on, and the headings it sits under."""

    text: str
    page: int | None = None
    heading: str | None = None  # "Page title › Section › Subsection" (HTML), None where unknown


@dataclass(frozen=True)
class Chunk:
    text: str  # starts with its heading path on a line of its own, when it has one
    ord: int  # position in the document, from 0
    page: int | None = None  # the page its own (not overlapped) text starts on
    heading: str | None = None  # the heading path of the section its own text starts in


def supported(path: Path) -> bool:
    return path.suffix.lower() in MIME


def read_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[str, list[Section]]:
    """(mime type, sections) of a file; `ReadError` when it cannot be read as text."""
    return read_bytes(path.name, load_file(path, max_bytes), where=str(path))


def load_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes, refusing one over the size limit before reading it, and anything that is
    not a regular file: a FIFO would wait for a writer, a device (/dev/zero) never end."""
    try:
        return read_regular(path, max_bytes)
    except NotRegularFile:
        raise ReadError(f"{path}: not a regular file (a folder, device, pipe or socket); give a document file") from None
    except TooLarge as e:
        raise ReadError(f"{path}: {e.size / 1e6:.1f} MB is over the {max_bytes / 1e6:g} MB limit; "
                        "split the file or raise the limit") from None


def read_bytes(name: str, data: bytes, where: str | None = None) -> tuple[str, list[Section]]:
    """Like `read_file`, for content already in memory (an upload); `name` gives the type."""
    where = where or name
    suffix = Path(name).suffix.lower()
    if suffix not in MIME:
        raise ReadError(f"{where}: unsupported file type {suffix or '(no extension)'}; "
                        f"supported: {', '.join(sorted(MIME))}")
    mime = MIME[suffix]
    try:
        if mime == "application/pdf":
            sections = _pdf(data)
        elif mime == "text/html":
            sections = _html(data)
        else:
            text = _decode(data)
            sections = [Section(_markdown(text) if mime == "text/markdown" else text)]
    except ReadError as e:
        raise ReadError(f"{where}: {e}") from None
    if not any(s.text.strip() for s in sections):
        raise ReadError(f"{where}: the document is empty (no text in it)")
    return mime, sections


def _binary(data: bytes) -> None:
    if b"\x00" in data:
        raise ReadError("the file looks binary (it contains NUL bytes), not text; "
                        "convert it to one of the supported types")


def _decode(data: bytes) -> str:
    # UTF-32's byte-order marks begin with UTF-16's: look for them first
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as e:
                raise ReadError(f"the file starts with a {codec.upper()} byte-order mark but is not {codec.upper()} "
                                f"text ({e.reason} at offset {e.start}); save it as UTF-8") from None
    _binary(data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ReadError(f"the file is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "save it as UTF-8") from None


# --- markdown -------------------------------------------------------------------------------

FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*)$")  # the closing #s are cut in _heading
RULE = re.compile(r"^\s{0,3}([-*_=])(\s*\1){2,}\s*$")  # --- *** ___ and setext === underlines
# The table rule is matched on the stripped line: with \s* at both ends of the pattern, a long run of spaces
# before something that is no rule took quadratic time (9 MB of indented list lines: minutes of a core)
TABLE_RULE = re.compile(r"^\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?$")
LINK_DEFINITION = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*\S+")
LINE_MARKERS = re.compile(r"^\s{0,3}(>\s?)*\s*([-*+]|\d+[.)])?\s+(?=\S)")  # quotes, list bullets
# Each span's text excludes what opens another (a bracket, a '<', the span's own marker; a code span ends
# at the first run of backticks as long as its own, of 1 to 3), so an opener that never closes is given up
# at the next one: with `.+?` or `[^\]]*`, every opener scanned the rest of the line (a 20 kB line of
# "*a " took 20 s, of backticks minutes: quadratic, and worse with the backreference).
INLINE = [
    (re.compile(r"!\[([^\[\]]*)\]\((?:[^()]|\([^()]*\))*\)"), r"\1"),  # image -> its alt text
    (re.compile(r"\[([^\[\]]+)\](\((?:[^()]|\([^()]*\))*\)|\[[^\[\]]*\])"), r"\1"),  # link -> its text
    (re.compile(r"<(https?://[^<>\s]+)>"), r"\1"),  # autolink
    (re.compile(r"</?[A-Za-z][^<>]*>"), ""),  # inline HTML
    (re.compile(r"(?<!`)(`{1,3})(?!`)(.+?)(?<!`)\1(?!`)"), r"\2"),  # code span: closed by a run as long
    (re.compile(r"(\*\*|__)(?=\S)((?:(?!\1).)+?)(?<=\S)\1"), r"\2"),  # bold
    (re.compile(r"(?<![\w*])\*(?=\S)([^*]+?)(?<=\S)\*(?![\w*])"), r"\1"),  # *italic*
    (re.compile(r"(?<!\w)_(?=\S)((?:[^_]|(?<=\w)_(?=\w))+?)(?<=\S)_(?!\w)"), r"\1"),  # _italic_ (snake_case kept)
]


def _markdown(text: str) -> str:
    """Markdown as the text a reader sees: markup gone, headings their own paragraphs,
    code kept as it is written."""
    out: list[str] = []
    fence = None
    for line in text.splitlines():
        mark = FENCE.match(line)
        if mark and fence in (None, mark.group(1)):
            fence = None if fence else mark.group(1)
            out.append("")
        elif fence:
            out.append(line)
        elif RULE.match(line):
            out.append("")
        elif TABLE_RULE.match(line.strip()) or LINK_DEFINITION.match(line):
            continue
        elif heading := HEADING.match(line):
            out += ["", _inline(_heading(heading.group(1))), ""]
        else:
            # without trailing spaces every run of spaces is followed by text, so the markers' pattern cannot
            # backtrack through a long run (it took quadratic time on ">" and thousands of spaces)
            line = LINE_MARKERS.sub("", line.rstrip())
            if line.lstrip().startswith("|"):
                line = " | ".join(cell.strip() for cell in line.strip().strip("|").split("|"))
            out.append(_inline(line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")


def _heading(text: str) -> str:
    """A heading's text without its closing #s ("## Title ##"), which only count after a space."""
    text = text.rstrip()
    bare = text.rstrip("#")
    return bare.rstrip() if bare != text and (not bare or bare[-1].isspace()) else text


def _inline(line: str) -> str:
    for pattern, replacement in INLINE:
        line = pattern.sub(replacement, line)
    return line


# --- HTML -----------------------------------------------------------------------------------

LEAVES = {"head", "p", "code", "row"}  # trafilatura's XML: each is one paragraph
CONTAINERS = {"main", "list", "item", "table", "cell", "quote"}
HTML_BLOCKS = ("p", "div", "section", "article", "li", "tr", "pre", "blockquote", "br",
               "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "table", "ul", "ol", "dl")


def _html(data: bytes) -> list[Section]:
    """One section per heading, each knowing the path of headings above it (the page title,
    h1, first), so a chunk deep in a long page still says what it is about."""
    _binary(data)
    data, root = shallow_html(data)  # the landmark walk reads the tree the depth check parsed: one parse, not two
    blocks = _landmark_blocks(data, root) or _trafilatura_blocks(data)
    return _sections(blocks) if blocks else [Section(_html_fallback(data))]


def _trafilatura_blocks(data: bytes) -> list[tuple[str, int | None]]:
    """Blocks (text, heading level or None) of the main text as trafilatura finds it."""
    xml = trafilatura.extract(data, output_format="xml", include_tables=True, include_comments=False,
                              favor_recall=True)
    main = etree.fromstring(xml.encode()).find("main") if xml else None
    blocks: list[tuple[str, int | None]] = []
    if main is not None:
        _walk(main, blocks)
    return blocks


def _sections(blocks: list[tuple[str, int | None]]) -> list[Section]:
    """Blocks (text, heading level or None) as sections that start at each heading."""
    sections: list[Section] = []
    path: list[tuple[int, str]] = []  # the open headings, outermost first
    body: list[str] = []

    def close():
        if body:
            heading = " › ".join(text for _, text in path) or None
            sections.append(Section("\n\n".join(body), heading=heading))

    for text, level in blocks:
        if level is not None:
            close()
            body = []
            path = [(lv, t) for lv, t in path if lv < level] + [(level, text)]
        body.append(text)
    close()
    return sections


def _walk(el: etree._Element, out: list[tuple[str, int | None]]) -> None:
    if el.tag in LEAVES or not any(child.tag in LEAVES | CONTAINERS for child in el):
        if el.tag == "code":
            text = "".join(el.itertext()).strip("\n")
        elif el.tag == "row":
            text = " | ".join(_squash("".join(cell.itertext())) for cell in el)
        else:
            text = _squash("".join(el.itertext())).rstrip("¶ ")  # Sphinx's heading anchors
        if text.strip():
            rend = el.get("rend", "") if el.tag == "head" else ""
            out.append((text, int(rend[1]) if re.fullmatch(r"h[1-6]", rend) else 6 if el.tag == "head" else None))
        return
    if el.text and el.text.strip():
        out.append((_squash(el.text), None))
    for child in el:
        _walk(child, out)
        if child.tail and child.tail.strip():
            out.append((_squash(child.tail), None))


# A page that marks its main content (<main>, or role="main": Sphinx, MkDocs, Read the Docs
# and most documentation generators do) is walked directly: its author has said where the text
# is, so trafilatura's guessing (pruning by XPath rules and link density, comparison with other
# extractors: ~90% of reading time on the Python manual) is not needed.
BLOCK_TAGS = {"address", "article", "aside", "blockquote", "caption", "dd", "details", "div", "dl", "dt",
              "fieldset", "figcaption", "figure", "footer", "header", "hr", "li", "main", "ol", "p",
              "pre", "section", "summary", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "ul",
              "h1", "h2", "h3", "h4", "h5", "h6"}
SKIP_TAGS = {"script", "style", "noscript", "template", "nav", "form", "button", "select", "textarea",
             "iframe", "svg", "object", "head", "footer", "aside"}
MAIN_XPATH = etree.XPath("//main | //*[@role='main']")


def _landmark_blocks(data: bytes, root=None) -> list[tuple[str, int | None]] | None:
    """Blocks (text, heading level or None) of the page's one main landmark; None where it has
    no single one (then trafilatura finds the main text). `root`: the page's tree where the caller
    has parsed it (it is only read)."""
    root = _parse_html(data) if root is None else root
    if root is None:
        return None
    mains = MAIN_XPATH(root)
    if len(mains) != 1:
        return None
    blocks: list[tuple[str, int | None]] = []
    _walk_html(mains[0], blocks)
    return blocks


def _walk_html(el, out: list[tuple[str, int | None]]) -> None:
    tag = el.tag if isinstance(el.tag, str) else ""  # comments and processing instructions: ""
    if _unseen(el) or _navigation(el):
        return
    if tag == "pre":
        _block("".join(el.itertext()).strip("\n"), None, out)
        return
    if tag == "tr":
        _block(" | ".join(_squash(cell.text_content()) for cell in el if cell.tag in ("td", "th")), None, out)
        return
    if not any(child.tag in BLOCK_TAGS for child in el.iterdescendants()):
        level = int(tag[1]) if tag in ("h1", "h2", "h3", "h4", "h5", "h6") else None
        _block(_squash(_visible_text(el)).rstrip("¶ "), level, out)  # ¶: Sphinx's heading anchors
        return
    if el.text and el.text.strip():
        _block(_squash(el.text), None, out)
    for child in el:
        _walk_html(child, out)
        if child.tail and child.tail.strip():
            _block(_squash(child.tail), None, out)


def _block(text: str, level: int | None, out: list[tuple[str, int | None]]) -> None:
    if text.strip():
        out.append((text, level))


def _visible_text(el) -> str:
    """The element's text without what a reader does not see (scripts, hidden parts), a line
    break where the page breaks the line."""
    hidden = []
    for e in el.iterdescendants():
        if e.tag == "br":
            e.tail = "\n" + (e.tail or "")
        elif _unseen(e):
            hidden.append(e)
    for e in hidden:
        e.drop_tree()  # its tail (text after it) stays
    return "".join(el.itertext())


def _unseen(el) -> bool:
    """An element a reader does not see or read: a script, a form, navigation, a hidden part."""
    return isinstance(el.tag, str) and (el.tag in SKIP_TAGS or el.get("hidden") is not None
                                        or el.get("aria-hidden") == "true")


def _navigation(el) -> bool:
    """A list that is nearly all links (a table of contents, a link farm): navigation, not text."""
    if el.tag not in ("ul", "ol") or sum(1 for _ in el.iter("li")) < 3:
        return False
    text = len(_squash(el.text_content()))
    links = sum(len(_squash(a.text_content())) for a in el.iterdescendants("a"))
    return text > 0 and links >= 0.9 * text


def _parse_html(data: bytes):
    """The page's tree; None where lxml finds no document. Bytes that are valid UTF-8 are read
    as UTF-8 (without a charset declaration lxml would take them for Latin-1)."""
    # one parser a call: lxml's parsers are not shared across threads
    parser = lxml.html.HTMLParser(encoding=_encoding(data))
    try:
        return lxml.html.fromstring(data, parser=parser)
    except (etree.ParserError, ValueError):
        return None


def _encoding(data: bytes) -> str | None:
    """UTF-8 for bytes that are valid UTF-8, else None: the page's own declaration, else Latin-1."""
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return None


# libxml2 stops reading a page nested deeper than 256 elements, and the rest of it is lost: a page of
# 200,000 nested <div>s around its text read as empty. Such a page is rebuilt with no element deeper than
# MAX_DEPTH, so the parser, trafilatura and the walks above (recursive, and quadratic in the depth) see all of it.
MAX_DEPTH = 128
TOO_DEEP = etree.XPath("/*" * (MAX_DEPTH + 1))  # the elements one level too deep: each step reads one level
NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # characters a tree's text cannot hold


def shallow_html(data: bytes) -> tuple[bytes, object]:
    """The page as it is, or, where it nests elements deeper than MAX_DEPTH, rewritten without the deeper
    elements (their text, but for what a reader does not see, goes in its place into the deepest one kept);
    and its tree, None where lxml finds no document, for the caller to read instead of parsing it again."""
    root = _parse_html(data)
    if root is None or not TOO_DEEP(root):
        return data, root
    rebuilt = etree.fromstring(data, etree.HTMLParser(target=_Shallow(), encoding=_encoding(data)))
    if rebuilt is None:
        return data, root
    _declare_utf8(rebuilt)
    data = etree.tostring(rebuilt, method="html", encoding="utf-8")
    return data, _parse_html(data)


def _declare_utf8(root: etree._Element) -> None:
    """Make a rebuilt page, written out as UTF-8, say so: each charset it declared (<meta charset>, <meta
    http-equiv="Content-Type">) becomes UTF-8, or, where it declared none, a <meta charset="utf-8"> opens its
    head. A reader that trusts the declaration (lxml given the bytes alone) read a windows-1251 page's rebuilt
    UTF-8 as windows-1251: mojibake."""
    declared = False
    for meta in root.iter("meta"):
        if meta.get("charset") is not None:
            meta.set("charset", "utf-8")
            declared = True
        if (meta.get("http-equiv") or "").strip().lower() == "content-type":
            meta.set("content", "text/html; charset=utf-8")
            declared = True
    if not declared:
        head = root.find("head")
        if head is None:
            head = etree.Element("head")
            root.insert(0, head)
        head.insert(0, etree.Element("meta", charset="utf-8"))


class _Shallow:
    """An lxml parser target (its events come in one pass, so no depth limit) building the page's tree
    down to MAX_DEPTH: text inside deeper elements goes, in its place, to the deepest element kept."""

    def __init__(self):
        self.root: etree._Element | None = None
        self.open: list[tuple[etree._Element, bool]] = []  # each open element's: where its text goes, hidden
        self.text: list[str] = []  # text not yet written, to `into` (or after its last child)
        self.into: etree._Element | None = None

    def start(self, tag: str, attrib) -> None:
        into, hidden = self.open[-1] if self.open else (None, False)
        if len(self.open) < MAX_DEPTH:
            into = self._element(into, tag, attrib)
        else:  # kept out, and what a reader does not see in it (a script, a hidden part) too
            hidden = hidden or tag in SKIP_TAGS or "hidden" in attrib or attrib.get("aria-hidden") == "true"
        self.open.append((into, hidden))

    def end(self, tag: str) -> None:
        if self.open:
            into, _ = self.open.pop()
            if not self.open or self.open[-1][0] is not into:  # an element closes: the text after it is its tail
                self._write()

    def data(self, text: str) -> None:
        if self.open and not self.open[-1][1]:
            if not self.text:
                self.into = self.open[-1][0]
            self.text.append(text)

    def close(self) -> etree._Element | None:
        self._write()
        return self.root

    def _element(self, parent: etree._Element | None, tag: str, attrib) -> etree._Element:
        if parent is None and self.root is not None:  # text after </html> opens another <html>: the same one
            return self.root
        self._write()  # the text so far goes before this element
        try:
            element = etree.Element(tag) if parent is None else etree.SubElement(parent, tag)
        except ValueError:  # a tag name lxml's tree cannot hold: its text goes to its parent
            return parent
        for name, value in attrib.items():
            try:
                element.set(name, NOT_XML.sub(" ", value))
            except ValueError:  # nor an attribute name
                pass
        if self.root is None:
            self.root = element
        return element

    def _write(self) -> None:
        """Write the text gathered since the last element opened or closed (one write: appending to an
        element's text over and over would copy it each time)."""
        text, self.text = NOT_XML.sub(" ", "".join(self.text)), []
        if not text or self.into is None:
            return
        if len(self.into):
            self.into[-1].tail = (self.into[-1].tail or "") + text
        else:
            self.into.text = (self.into.text or "") + text


def _html_fallback(data: bytes) -> str:
    """Every visible text of the page, one paragraph per block element."""
    root = _parse_html(data)
    if root is None:
        return ""
    for el in root.xpath("//script | //style | //noscript | //template | //head"):
        el.drop_tree()
    for el in root.iter(*HTML_BLOCKS):
        el.tail = "\n\n" + (el.tail or "")
    paragraphs = (_squash(p) for p in re.split(r"\n\s*\n", root.text_content()))
    return "\n\n".join(p for p in paragraphs if p)


def _squash(text: str) -> str:
    return " ".join(text.split())


# --- PDF ------------------------------------------------------------------------------------


def _pdf(data: bytes) -> list[Section]:
    if data.lstrip()[:5] != b"%PDF-":
        raise ReadError("the file is not a PDF (it does not start with %PDF-)")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        locked = reader.is_encrypted and not reader.decrypt("")
        pages = [] if locked else [Section((p.extract_text() or "").strip(), n) for n, p in enumerate(reader.pages, 1)]
    except (PyPdfError, ValueError, KeyError, TypeError) as e:  # pypdf lets some parse errors through raw
        raise ReadError(f"the PDF cannot be read ({type(e).__name__}: {e})") from None
    if locked:
        raise ReadError("the PDF is password-protected; save an unprotected copy")
    if pages and not any(p.text for p in pages):
        raise ReadError(f"the PDF has {len(pages)} page(s) but no text layer (a scan?); "
                        "run OCR on it first (e.g. ocrmypdf) and ingest the result")
    return pages


# --- chunking -------------------------------------------------------------------------------

SENTENCE_END = re.compile(r"(?<=[.!?])(\s+)")
WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class _Unit:
    """A sentence (or a piece of a long one) with the whitespace that came before it."""

    text: str
    words: int
    sep: str  # "\n\n" at a paragraph start
    page: int | None
    heading: str | None
    opens: bool = False  # the first unit of a section with a heading


def reader_process_init(parent: int) -> None:
    """Run first in a reader process (`ingest`'s): it ends when `parent` does, even when that is
    killed outright (Linux's parent-death signal; elsewhere it ends with its task queue)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(0)


def read_chunks(path: Path, max_bytes: int, words: int, overlap: int,
                skip: frozenset[str] = frozenset()) -> tuple[str, str, list[Chunk] | None]:
    """(sha256, media type, chunks) of a file on disk; chunks None, and nothing parsed, where the
    sha256 is in `skip` (its bytes are stored already). Raises ReadError or OSError. This module
    does not import torch, so `ingest` can run this in a reader process of its own."""
    data = load_file(path, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    if digest in skip:
        return digest, "", None
    mime, sections = read_bytes(path.name, data, where=str(path))
    return digest, mime, chunk_sections(sections, words, overlap)


def chunk_sections(sections: list[Section], words: int = 200, overlap: int = 40) -> list[Chunk]:
    """Overlapping chunks of at most `words` words, cut at paragraph or sentence ends."""
    if words < 20 or not 0 <= overlap <= words // 2:
        raise ReadError(f"chunks need at least 20 words and an overlap of at most half of them "
                        f"(got words={words}, overlap={overlap})")
    chunks: list[Chunk] = []
    current: list[_Unit] = []  # the chunk being filled; its first `carried` units overlap
    carried = size = 0
    for unit in _units(sections, words - overlap):
        full = size + unit.words > words or (unit.sep == "\n\n" and size >= words * 3 // 4)
        new_section = unit.opens and size >= words // 4  # a heading starts a chunk, unless the last one is tiny
        if (full or new_section) and len(current) > carried:
            chunks.append(_chunk(current, carried, len(chunks)))
            current = [] if new_section else _tail(current, overlap)  # no overlap across a heading
            carried, size = len(current), sum(u.words for u in current)
        current.append(unit)
        size += unit.words
    if len(current) > carried:
        chunks.append(_chunk(current, carried, len(chunks)))
    return chunks


def _units(sections: list[Section], limit: int):
    for section in sections:
        first = section.heading is not None
        for paragraph in re.split(r"\n\s*\n", section.text):
            if not paragraph.strip():
                continue
            parts = SENTENCE_END.split(paragraph.strip())  # sentence, space, sentence, ...
            seps = ["\n\n"] + ["\n" if "\n" in s else " " for s in parts[1::2]]
            for sentence, sep in zip(parts[0::2], seps):
                for i, piece in enumerate(_pieces(sentence, limit)):
                    yield _Unit(piece, len(WORD.findall(piece)), sep if i == 0 else " ", section.page,
                                section.heading, first)
                    first = False


def _pieces(text: str, limit: int) -> list[str]:
    """`text` cut into runs of at most `limit` words, its own whitespace kept inside each."""
    starts = [m.start() for m in WORD.finditer(text)][::limit]
    return [text[a:b].rstrip() for a, b in zip(starts, starts[1:] + [len(text)])]


def _tail(units: list[_Unit], overlap: int) -> list[_Unit]:
    """The last `overlap` words of a chunk to start the next one: whole sentences if the last
    one fits, else the end of that one."""
    tail: list[_Unit] = []
    size = 0
    for unit in reversed(units):
        if size + unit.words > overlap:
            break
        tail.insert(0, unit)
        size += unit.words
    if not tail and overlap:
        last = units[-1]
        words = WORD.findall(last.text)[-overlap:]
        start = [m.start() for m in WORD.finditer(last.text)][-len(words)]
        tail = [_Unit(last.text[start:], len(words), "", last.page, last.heading)]
    return tail


def _chunk(units: list[_Unit], carried: int, ord: int) -> Chunk:
    """The units as one text, under the heading path of its own first unit: the path is part of
    the text that is embedded and indexed, and of the passage a reader is shown."""
    text = units[0].text + "".join(u.sep + u.text for u in units[1:])
    heading = units[carried].heading
    if heading and not text.startswith(heading):
        text = f"{heading}\n\n{text}"
    return Chunk(text, ord, units[carried].page, heading)
