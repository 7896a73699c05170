"""HTML mail bodies to plain text, with the stdlib's tolerant `html.parser`.

Blocks become line breaks, list items "- ", `<pre>` keeps its layout, entities are decoded. A `<` that does not open
a real tag (`while (n<m && k>1)`, `#include <stdio.h>`, `Jean <j@x.org>`) stays text: html.parser would take
`<m && k>` for a tag and drop it. Quoted replies and invisible parts are dropped, so the previous mails of a thread
do not come back as text:
- containers of the quote: `<blockquote>` (Apple Mail, Roundcube, Thunderbird `type=cite`), Gmail's `gmail_quote`,
  Thunderbird's `moz-cite-prefix`, Yahoo's `yahoo_quoted`, ProtonMail's `protonmail_quote`, Zoho's `zmail_extra`;
- markers after which the rest of the document is the quoted mail: Outlook on the web / new Outlook
  (`#appendonsend`, `#divRplyFwdMsg`), Zimbra (`hr#zwchr`), Outlook.com (`hr#stopSpelling`), Outlook for Mac/iOS
  (`#mail-editor-reference-message-container`), old Outlook (`.OutlookMessageHeader`), and Outlook desktop's header
  block (an element with a top border holding "From:" / "De :" / "Von:" and "Sent:" / "Envoyé :" ... labels);
- `<head>`, `<style>`, `<script>`, `<title>`.

`looks_like_html` decides for bodies of unknown type (tickets, CSV, chat) whether they are HTML at all: only when
written as HTML (see its docstring); text that mentions tags or compares with `<` and `>` stays as written.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from html.parser import HTMLParser

_INVISIBLE = {"head", "style", "script", "title", "template", "noscript"}
_QUOTES = {"blockquote"}
# An element with one of these classes or ids holds the quoted mail: it is dropped, what follows it is kept.
_QUOTE_MARKERS = re.compile(r"gmail_quote|moz-cite-prefix|yahoo_quoted|protonmail_quote|zmail_extra", re.I)
# From an element with one of these ids or classes to the end of the document, all is the quoted mail.
_CUT_MARKERS = re.compile(r"divRplyFwdMsg|appendonsend|OutlookMessageHeader|zwchr|stopSpelling|"
                          r"mail-editor-reference-message-container", re.I)
# Outlook desktop: `<div style="border:none;border-top:solid #E1E1E1 1.0pt;...">` around the reply header.
_TOP_BORDER = re.compile(r"border-top\s*:\s*(?:solid|[^;]*\bsolid\b)", re.I)
_HEADER_TEXT = re.compile(
    r"^\s*(?:From|De|Von|Van|Da)\s*:.{0,400}?\n\s*(?:Sent|Envoyé|Gesendet|Date|Datum|To|À|An|Cc|Subject|Objet|Betreff"
    r"|Verzonden|Inviato|Enviado)\s*:", re.I | re.S)
_BLOCKS = {"p", "div", "br", "tr", "table", "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
           "hr", "section", "article", "header", "footer", "dl", "dt", "dd", "address", "blockquote", "center"}
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "track", "wbr"}
_SPACES = re.compile(r"[ \t\r\n\f]+")
_PRE_LINE = "\x00"  # marks the start of a line inside <pre>

# The tags of mail HTML. `<word>` with another name is a tag only with an `attribute=value` (`<path d="M0">`) or a
# namespace (`<o:p>`): `sbatch <options> <script>`, `vector<int>`, `<your_login>` are text.
HTML_TAGS = ("html", "head", "body", "div", "p", "br", "hr", "span", "font", "a", "b", "i", "u", "em", "strong",
             "table", "tbody", "tr", "td", "th", "ul", "ol", "li", "blockquote", "pre", "code", "img", "style",
             "h1", "h2", "h3", "h4", "h5", "h6")
_MAIL_TAGS = frozenset(HTML_TAGS) | {
    "meta", "link", "title", "base", "script", "noscript", "template", "s", "strike", "small", "big", "sub", "sup",
    "tt", "kbd", "samp", "q", "cite", "abbr", "del", "ins", "mark", "center", "thead", "tfoot", "caption", "col",
    "colgroup", "dl", "dt", "dd", "figure", "figcaption", "section", "article", "header", "footer", "nav", "aside",
    "address", "wbr", "nobr", "o:p"}
_RAW_TEXT = {"script", "style", "title", "textarea"}  # the parser reads their content up to the closing tag
_BOOLEAN_ATTRIBUTES = frozenset(
    "nowrap noshade compact checked selected disabled readonly hidden multiple autofocus required open async defer "
    "itemscope allowfullscreen novalidate reversed contenteditable draggable spellcheck translate".split())
_ATTRIBUTE_NAME = re.compile(r"[a-zA-Z_:@][-\w:.@]*$")
_TAG_AT = re.compile(
    r"""<!--.*?(?:-->|\Z)|<![a-zA-Z\[][^>]*>|<\?[^>]*>|</([a-zA-Z][\w:-]*)\s*>"""
    r"""|<([a-zA-Z][\w:.-]*)((?:\s+[^\s"'<>/=]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)*)\s*/?>""",
    re.S)
_ATTRIBUTE = re.compile(r"""([^\s"'<>/=]+)(\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?""")
_DOCUMENT_START = re.compile(r"(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*(?:<!doctype\s+html|<html(?=[\s>]))", re.I | re.S)
_OFFICE_NAMESPACE = re.compile(r"(?:o|v|w|m|x|st\d):[a-z]", re.I)  # Word's <o:p>, <v:shape>, <st1:place>
_HTML_SCAN_CHARS = 10000


def _is_real_tag(match: re.Match, lower_text: str) -> bool:
    """Whether a `_TAG_AT` match is markup: a comment, a declaration, an end tag, or a start tag whose name is a tag
    of mail HTML (or namespaced, or has an attribute=value) and whose attributes are attributes."""
    name = match.group(2)
    if name is None:
        return True  # a comment, <!doctype>, <![if ...]>, <?xml?>, or an end tag
    name = name.lower()
    attributes = _ATTRIBUTE.findall(match.group(3) or "")
    for attribute, value in attributes:
        if not _ATTRIBUTE_NAME.match(attribute):
            return False  # `<m && k>`
        if not value and attribute.lower() not in _BOOLEAN_ATTRIBUTES and not attribute.lower().startswith(
                ("data-", "aria-")):
            return False  # `<b and c >`: bare words are no attributes
    if name in _RAW_TEXT and f"</{name}" not in lower_text[match.end():]:
        return False  # an unclosed <script> would hide the rest of the text
    return name in _MAIL_TAGS or bool(_OFFICE_NAMESPACE.match(name)) or any(value for _, value in attributes)


def _tags(text: str) -> list[re.Match]:
    """The real tags of `text`, in order."""
    found, lower, position = [], None, text.find("<")
    while position != -1:
        match = _TAG_AT.match(text, position)
        if match is not None:
            if lower is None:
                lower = text.lower()
            if _is_real_tag(match, lower):
                found.append(match)
                position = text.find("<", match.end())
                continue
        position = text.find("<", position + 1)
    return found


def _glued(match: re.Match, text: str) -> bool:
    """Whether a tag is written as markup, against the text around it: `<p>Bonjour`, `fails.</p>`, `Hi,<br>Run`,
    `Bonjour,<br>` ending a line, `</b><br>`. A tag between spaces or brackets ("the <td> tag", "un <div> vide",
    "(<pre>)") is named in a sentence."""
    before = text[match.start() - 1] if match.start() else "\n"
    after = text[match.end()] if match.end() < len(text) else "\n"
    if after.isalnum() or after in "<&" or before.isalnum() or before == ">":
        return True
    attached_before = not before.isspace() and before not in "(\"'`«“‘["
    return attached_before and (after == "\n" or match.group(0).startswith("</"))


def looks_like_html(text: str) -> bool:
    """Whether a body of unknown type (tickets, CSV, chat) is HTML. E-mail needs none of this: its MIME type says.

    HTML is text written as markup, one of:
    - a full document: it starts with `<!doctype html>` or `<html>` (after an XML declaration or comments);
    - it opens with a tag written as markup (`<div dir="ltr">Hi`, `<table><tr>`) and either ends with a tag, or
      has a quarter of its characters inside tags, or a tag on 80% of its lines; or it opens with a tag alone on
      its line and ends with a tag;
    - nearly every line (all but one; 80% of ten or more) holds a tag written as markup: `Bonjour,<br>` lines,
      the one line `Line one<br/>Line two` or `Hello <b>world</b>`.
    A tag is a tag of mail HTML with attributes that are attributes: `Jean <p.dupont@x.org>`, `#include <stdio.h>`,
    `while (n<m && k>1)`, `<your_login>` are none. Written as markup, it touches the words around it; a tag between
    spaces ("the <table> and <td> tags", "a <br> tag") is named in a sentence. So prose about tags, and prose with a
    pasted snippet, is not HTML: it stays as written, line for line."""
    head = text[:_HTML_SCAN_CHARS]
    if "<" not in head:
        return False
    body = head.strip()
    if _DOCUMENT_START.match(body):
        return True
    tags = _tags(body)
    if not tags:
        return False
    num_lines = sum(1 for line in body.split("\n") if line.strip())
    nearly_all = max(1, min(num_lines - 1, math.ceil(0.8 * num_lines)))
    glued = [tag for tag in tags if _glued(tag, body)]
    ends_with_tag = tags[-1].end() == len(body)
    if tags[0].start() == 0:
        rest = body[tags[0].end():]
        if (glued and glued[0] is tags[0]) or rest.lstrip().startswith("<"):  # `<div dir="ltr">Hi`, `<table>\n<tr>`
            markup = sum(tag.end() - tag.start() for tag in tags)
            non_blank = sum(1 for ch in body if not ch.isspace())
            if ends_with_tag or markup >= non_blank / 4 or _lines_with(tags, body) >= 0.8 * num_lines:
                return True
        elif rest.startswith("\n") and ends_with_tag:  # laid out: `<div>`, lines, `</div>`
            return True
    return _lines_with(glued, body) >= nearly_all


def _lines_with(tags: list[re.Match], text: str) -> int:
    """How many lines of `text` hold one of `tags`."""
    count, k, position = 0, 0, 0
    for line in text.split("\n"):
        end = position + len(line)
        while k < len(tags) and tags[k].end() <= position:
            k += 1
        if line.strip() and k < len(tags) and tags[k].start() < end:
            count += 1
        position = end + 1
    return count


def _escaped_text_brackets(html: str) -> str:
    """`html` with each `<` that opens no real tag written `&lt;`, so the parser keeps it as text."""
    pieces, position = [], 0
    for tag in _tags(html):
        pieces.append(html[position : tag.start()].replace("<", "&lt;"))
        pieces.append(tag.group(0))
        position = tag.end()
    pieces.append(html[position:].replace("<", "&lt;"))
    return "".join(pieces)


class _TextExtractor(HTMLParser):
    def __init__(self, drop_quotes: bool):
        super().__init__(convert_charrefs=True)
        self.drop_quotes = drop_quotes
        self.parts: list[str] = []
        self.open_tags: list[str] = []
        self.open_counts: Counter = Counter()  # of open_tags: a stray end tag is found without a scan of the stack
        self.hidden_depth: int | None = None  # depth of the open element whose content is dropped
        self.pre_depth = 0
        self.cut = False  # a marker of the quoted mail was met: the rest of the document is dropped
        self.header_block: tuple[int, int] | None = None  # (depth, parts index) of a bordered block, maybe a header

    def _hides(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in _INVISIBLE:
            return True
        if not self.drop_quotes:
            return False
        if tag in _QUOTES:
            return True
        return bool(_QUOTE_MARKERS.search(_markers(attrs)))

    def _cuts_here(self, attrs) -> bool:
        """Whether this element starts the quoted previous mail that runs to the end of the document (Outlook on the
        web's header, Zimbra's rule...): then nothing more is kept."""
        if self.drop_quotes and self.hidden_depth is None and _CUT_MARKERS.search(_markers(attrs)):
            self.cut = True
        return self.cut

    def handle_starttag(self, tag, attrs):
        if self._cuts_here(attrs):
            return
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
        if (self.drop_quotes and self.hidden_depth is None and self.header_block is None
                and _TOP_BORDER.search(dict(attrs).get("style") or "")):
            self.header_block = (len(self.open_tags), len(self.parts))
        if tag == "pre":
            self.pre_depth += 1
            self.parts.append(_PRE_LINE)

    def handle_startendtag(self, tag, attrs):
        if self._cuts_here(attrs):
            return
        if tag in _BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.cut or not self.open_counts[tag]:
            return  # a stray end tag: ignore it, as browsers do
        while self.open_tags:  # close what was left open inside (<p> and <li> often are)
            closed = self.open_tags.pop()
            self.open_counts[closed] -= 1
            if closed == "pre":
                self.pre_depth -= 1
            if self.hidden_depth is not None and len(self.open_tags) < self.hidden_depth:
                self.hidden_depth = None
            if self.header_block is not None and len(self.open_tags) < self.header_block[0]:
                start = self.header_block[1]
                self.header_block = None
                if _HEADER_TEXT.match("".join(self.parts[start:]).replace(_PRE_LINE, "").replace("\xa0", " ")):
                    del self.parts[start:]  # Outlook's reply header: it and all after it are the quoted mail
                    self.cut = True
                    return
            if closed == tag:
                break
        if tag in _BLOCKS and tag != "li":
            self.parts.append("\n")

    def handle_data(self, data):
        if self.hidden_depth is not None or self.cut:
            return
        if self.pre_depth:  # keep the layout: mark each line so the final tidying leaves its indentation alone
            self.parts.append(data.replace("\n", "\n" + _PRE_LINE))
        else:
            self.parts.append(_SPACES.sub(" ", data))


def _markers(attrs: list[tuple[str, str | None]]) -> str:
    return " ".join(value or "" for name, value in attrs if name in ("class", "id"))


def html_to_text(html: str, drop_quotes: bool = True) -> str:
    parser = _TextExtractor(drop_quotes)
    parser.feed(_escaped_text_brackets(html))
    parser.close()
    text = "".join(parser.parts).replace("\xa0", " ")
    lines = [line[1:].rstrip() if line.startswith(_PRE_LINE) else line.strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()
