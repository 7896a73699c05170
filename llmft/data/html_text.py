"""HTML mail bodies to plain text, with the stdlib's tolerant `html.parser`.

Blocks become line breaks, list items "- ", `<pre>` keeps its layout, entities are decoded. Quoted replies
(`<blockquote>`, Gmail's `gmail_quote`, Thunderbird's `moz-cite-prefix`, Outlook's reply header) and invisible
parts (`<head>`, `<style>`, `<script>`) are dropped, so the previous mails of a thread do not come back as text.
"""

from __future__ import annotations

import re
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
_LOOKS_LIKE_HTML = re.compile(r"<\s*(html|body|div|p|br|span|table|blockquote|a\s|b>|i>|ul|ol|li|font|pre)\b", re.I)


def looks_like_html(text: str) -> bool:
    return bool(_LOOKS_LIKE_HTML.search(text[:4000]))


class _TextExtractor(HTMLParser):
    def __init__(self, drop_quotes: bool):
        super().__init__(convert_charrefs=True)
        self.drop_quotes = drop_quotes
        self.parts: list[str] = []
        self.open_tags: list[str] = []
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
        if self.hidden_depth is None and self._hides(tag, attrs):
            self.hidden_depth = len(self.open_tags)
        if tag == "pre":
            self.pre_depth += 1
            self.parts.append(_PRE_LINE)

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag not in self.open_tags:
            return  # a stray end tag: ignore it, as browsers do
        while self.open_tags:  # close what was left open inside (<p> and <li> often are)
            closed = self.open_tags.pop()
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
