"""Finding the web address in a message: NLU's `url` slot and the web stage's fallback.

    url_span("summarise example.com/news, please")   # ("https://example.com/news", (10, 26))
    find_url("see https://example.com/a?b=1.")       # "https://example.com/a?b=1"

An http(s) URL anywhere wins; otherwise a bare domain with a common top-level domain
(so `config.py` or `notes.txt` is not taken for a site) becomes an https URL. Sentence
punctuation after it is not part of it, unless a ")" closes a "(" inside the URL.
"""

from __future__ import annotations

import re

TLDS = ("com|org|net|edu|gov|io|dev|ai|app|info|co|uk|de|fr|es|it|nl|pt|eu|us|ca|au|jp|ch|se|no|be|at|"
        "ie|me|tv|ly|xyz|wiki|news|blog|site|tech")
URL_IN_TEXT = re.compile(r"https?://[^\s<>\"'`]+", re.I)
BARE_DOMAIN = re.compile(rf"(?<![\w@./-])(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+(?:{TLDS})"
                         r"(?::\d+)?(?:/[^\s<>\"'`]*)?(?![\w-])", re.I)


def url_span(text: str) -> tuple[str, tuple[int, int]] | None:
    """The message's URL (https:// added to a bare domain) and where it stands in `text`."""
    match = URL_IN_TEXT.search(text) or BARE_DOMAIN.search(text)
    if match is None:
        return None
    found = match.group(0)
    while found and found[-1] in ".,;:!?)]}":  # sentence punctuation, unless it closes a "(" in the URL
        if found[-1] == ")" and found.count("(") >= found.count(")"):
            break
        found = found[:-1]
    start = match.start()
    url = found if re.match(r"https?://", found, re.I) else "https://" + found
    return url, (start, start + len(found))


def find_url(text: str) -> str | None:
    span = url_span(text)
    return span[0] if span else None
