"""HTML mail bodies to plain text, with the stdlib's tolerant `html.parser`.

Blocks become line breaks, list items "- ", `<pre>` keeps its layout, entities are decoded. Quoted replies
(`<blockquote>`, Gmail's `gmail_quote`, Thunderbird's `moz-cite-prefix`, Outlook's reply header) and invisible
parts (`<head>`, `<style>`, `<script>`) are dropped, so the previous mails of a thread do not come back as text.
"""

from __future__ import annotations

import re
from collections import Counter
from html.parser import HTMLParser

_INVISIBLE = {"head", "style", "script", "title", "template", "noscript"}
_QUOTES = {"blockquote"}
_QUOTE_MARKERS = re.compile(r"gmail_quote|moz-cite-prefix|yahoo_quoted|divRplyFwdMsg|OutlookMessageHeader|"
                            r"protonmail_quote|zmail_extra", re.I)
_BLOCKS = {"p", "div", "br", "tr", "table", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
           "hr", "section", "article", "header", "footer", "dl", "dt", "dd", "address"}
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "track", "wbr"}
_SPACES = re.compile(r"[ \t\r\n\f]+")
_PRE_LINE = "\x00"  # marks the start of a line inside <pre>
# The tags `looks_like_html` looks for. A tag counts only when written as one: its name followed by `>`, `/` or a
# space, so the address in `Jean Dupont <p.dupont@example.org>` or `<li.wei@x.cn>` is no tag.
HTML_TAGS = ("html", "head", "body", "div", "p", "br", "hr", "span", "font", "a", "b", "i", "u", "em", "strong",
             "table", "tbody", "tr", "td", "th", "ul", "ol", "li", "blockquote", "pre", "code", "img", "style",
             "h1", "h2", "h3", "h4", "h5", "h6")
_TAG_NAMES = "|".join(sorted(HTML_TAGS, key=len, reverse=True))
_START_TAG = re.compile(rf"<({_TAG_NAMES})(?=[\s/>])[^<>]*>", re.I)
_CLOSING_TAG = re.compile(rf"</({_TAG_NAMES})\s*>", re.I)
_DOCUMENT = re.compile(r"<!doctype\s+html|<html(?=[\s>])|<br\s*/?>", re.I)
_HTML_SCAN_CHARS = 10000


def looks_like_html(text: str) -> bool:
    """Whether a body of unknown type (tickets, CSV, chat) is HTML, by its structure: a doctype, `<html>`, `<br>`, a
    closing tag such as `</p>`, or start tags of two distinct names. One `<word` is no HTML: `Name <p.name@host>`
    is an address, "the <pre> tag" a sentence. E-mail needs none of this: its MIME type says (text/html part)."""
    head = text[:_HTML_SCAN_CHARS]
    if "<" not in head:
        return False
    if _DOCUMENT.search(head) or _CLOSING_TAG.search(head):
        return True
    names = set()
    for match in _START_TAG.finditer(head):
        names.add(match.group(1).lower())
        if len(names) >= 2:
            return True
    return False


class _TextExtractor(HTMLParser):
    def __init__(self, drop_quotes: bool):
        super().__init__(convert_charrefs=True)
        self.drop_quotes = drop_quotes
        self.parts: list[str] = []
        self.open_tags: list[str] = []
        self.open_counts: Counter = Counter()  # of open_tags: a stray end tag is found without a scan of the stack
        self.hidden_depth: int | None = None  # depth of the open element whose content is dropped
        self.pre_depth = 0

    def _hides(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in _INVISIBLE:
            return True
        if not self.drop_quotes:
            return False
        if tag in _QUOTES:
            return True
        markers = " ".join(value or "" for name, value in attrs if name in ("class", "id"))
        return bool(_QUOTE_MARKERS.search(markers))

    def handle_starttag(self, tag, attrs):
        if tag in _BLOCKS:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")
        if tag in _VOID:
            return
        self.open_tags.append(tag)
        self.open_counts[tag] += 1
        if self.hidden_depth is None and self._hides(tag, attrs):
            self.hidden_depth = len(self.open_tags)
        if tag == "pre":
            self.pre_depth += 1
            self.parts.append(_PRE_LINE)

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if not self.open_counts[tag]:
            return  # a stray end tag: ignore it, as browsers do
        while self.open_tags:  # close what was left open inside (<p> and <li> often are)
            closed = self.open_tags.pop()
            self.open_counts[closed] -= 1
            if closed == "pre":
                self.pre_depth -= 1
            if self.hidden_depth is not None and len(self.open_tags) < self.hidden_depth:
                self.hidden_depth = None
            if closed == tag:
                break
        if tag in _BLOCKS and tag != "li":
            self.parts.append("\n")

    def handle_data(self, data):
        if self.hidden_depth is not None:
            return
        if self.pre_depth:  # keep the layout: mark each line so the final tidying leaves its indentation alone
            self.parts.append(data.replace("\n", "\n" + _PRE_LINE))
        else:
            self.parts.append(_SPACES.sub(" ", data))


def html_to_text(html: str, drop_quotes: bool = True) -> str:
    parser = _TextExtractor(drop_quotes)
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts).replace("\xa0", " ")
    lines = [line[1:].rstrip() if line.startswith(_PRE_LINE) else line.strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
