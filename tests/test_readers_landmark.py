"""The HTML reader's direct walk of a page's main landmark (<main>, role="main"), against
trafilatura's extraction, which it replaces on such pages (benchmarks/ingest_readers.py compares
the two over a whole manual)."""

import difflib
from pathlib import Path

import pytest

from parley.pipeline import readers
from parley.pipeline.readers import chunk_sections, read_bytes

SIDEBAR = (b"<div class='sphinxsidebar' role='navigation'><h3>Previous topic</h3><p><a href='a.html'>"
           b"Older page</a></p><ul><li><a href='x'>Report a Bug</a></li></ul></div>")
SPHINX = (b"<html><head><title>kettles</title><script>var x = 1</script></head><body>"
          b"<div class='related' role='navigation'><a href='index.html'>Python docs</a> &#187;</div>"
          b"<div class='document'><div class='body' role='main'><section id='kettles'>"
          b"<h1><code>kettles</code> \xe2\x80\x94 Boiling water<a class='headerlink' href='#k'>\xc2\xb6</a></h1>"
          b"<p>This module boils water<br>for tea.</p>"
          b"<div class='toctree-wrapper'><ul><li><a href='a.html'>Descaling</a></li><li><a href='b.html'>Safety</a>"
          b"</li><li><a href='c.html'>Vinegar</a><ul><li><a href='d.html'>Strength</a></li></ul></li></ul></div>"
          b"<dl class='py function'><dt id='kettles.boil'><span class='pre'>kettles.</span><span class='pre'>boil"
          b"</span>(<em>litres</em>)<a class='headerlink' href='#kettles.boil'>\xc2\xb6</a></dt>"
          b"<dd><p>Boil <em>litres</em> of water and return the seconds it took.</p>"
          b"<div class='highlight'><pre><span>t</span> = boil(1)\nif t &gt; 60:\n    descale()</pre></div></dd></dl>"
          b"<section id='table'><h2>Sizes<a class='headerlink' href='#t'>\xc2\xb6</a></h2>"
          b"<table><thead><tr><th>Model</th><th>Litres</th></tr></thead><tbody><tr><td>K1</td><td>1.7</td></tr>"
          b"</tbody></table><p>Prices<span hidden>secret</span> vary.<script>track()</script></p>"
          b"<p>See <a href='a.html'>descaling</a>, <a href='b.html'>safety</a> and <a href='c.html'>vinegar</a>.</p>"
          b"</section></section></div></div>" + SIDEBAR + b"<footer>Copyright 2026</footer></body></html>")


def test_a_main_landmark_is_walked_block_by_block_under_its_headings():
    _, sections = read_bytes("kettles.html", SPHINX)
    assert [s.heading for s in sections] == ["kettles — Boiling water", "kettles — Boiling water › Sizes"]
    first = sections[0].text.split("\n\n")
    assert first == ["kettles — Boiling water", "This module boils water for tea.",  # the ¶ anchor gone, <br> a space
                     "kettles.boil(litres)", "Boil litres of water and return the seconds it took.",
                     "t = boil(1)\nif t > 60:\n    descale()"]  # code as written; the all-links contents list gone
    assert sections[1].text.split("\n\n") == ["Sizes", "Model | Litres", "K1 | 1.7", "Prices vary.",
                                              "See descaling, safety and vinegar."]  # prose with links stays
    everything = "".join(s.text for s in sections)
    for outside in ("Python docs", "Previous topic", "Older page", "Report a Bug", "Copyright", "var x", "track",
                    "secret", "¶"):
        assert outside not in everything
    chunks = chunk_sections(sections, words=40, overlap=10)
    assert chunks[-1].heading == "kettles — Boiling water › Sizes" and chunks[-1].text.startswith(chunks[-1].heading)


@pytest.mark.parametrize("page", [
    b"<html><body><article><h1>Solar</h1><p>Panels turn sunlight into electricity for the whole house.</p>"
    b"</article></body></html>",  # no landmark
    b"<html><body><main><h1>Solar</h1><p>Panels turn sunlight into electricity.</p></main>"
    b"<main><p>A second main: which one is the page's?</p></main></body></html>",  # two
])
def test_without_one_main_landmark_trafilatura_reads_the_page(page):
    assert readers._landmark_blocks(page) is None
    assert read_bytes("solar.html", page)[1] == readers._sections(readers._trafilatura_blocks(page))


MANUAL = Path("/usr/share/doc/python3.11/html")


@pytest.mark.skipif(not (MANUAL / "library" / "functools.html").is_file(), reason="apt-get install python3.11-doc")
@pytest.mark.parametrize("page", ["library/functools.html", "tutorial/controlflow.html", "library/json.html"])
def test_on_manual_pages_the_walk_gives_trafilaturas_words_and_headings(page):
    """Where trafilatura reads a page well, the walk reads the same text under the same headings
    (over the whole manual: benchmarks/ingest_readers.py)."""
    data = (MANUAL / page).read_bytes()
    ours = readers._sections(readers._landmark_blocks(data))
    theirs = readers._sections(readers._trafilatura_blocks(data))
    assert [s.heading for s in ours] == [s.heading for s in theirs]
    a, b = ([w for s in sections for w in s.text.split()] for sections in (theirs, ours))
    assert difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() > 0.98
