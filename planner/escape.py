"""The one escaping function per output format, for text the bot did not write itself.

Service names, domains, field paths, warnings, Nix error messages and terraform output come from
a pull request or a tool. They reach a reader only through these functions, so that no such text
can end a code span, a fence, a table cell, a `<details>` block or an HTML comment, nor produce
raw HTML, an image, a link or a mention. Pure functions: no I/O, no imports of ours.
"""

from __future__ import annotations

import html
import re
import unicodedata

WORD_JOINER = "\u2060"  # invisible; breaks `@user`, `http://` and `#12` without changing the look
REPLACEMENT = "\ufffd"
# Unicode controls that reorder text (a name can make the following text read backwards)
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")

# CommonMark allows `\` before any ASCII punctuation; these are the ones that start markup
# anywhere in a line (code spans, emphasis, strikethrough, links and images, math, cells)
MD_BACKSLASHED = frozenset("\\`*_~[]$|")
MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
MD_TABLE = str.maketrans({**MD_ENTITIES, **{char: "\\" + char for char in MD_BACKSLASHED}})
# at the start of a block these begin a heading, list, quote, setext line or thematic break
MD_BLOCK_STARTS = frozenset("#+-=>")
MD_ORDERED_LIST = re.compile(r"^(\d{1,9})([.)])")
# GitHub links bare URLs, `www.` hosts and `#123` references, and mentions `@user`
AUTOLINKS = re.compile(r"(?<=:)(?=//)|(?<=\bwww)(?=\.)|(?<=#)(?=\d)|(?<=@)", re.IGNORECASE)

SLACK_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# Slack has no escape for a backtick: show it as a look-alike that cannot start or end code
SLACK_BACKTICK = "\u02cb"
SLACK_TABLE = str.maketrans(SLACK_ENTITIES)
SLACK_AUTOLINKS = re.compile(r"(?<=:)(?=//)|(?<=\bwww)(?=\.)", re.IGNORECASE)

# characters a Mermaid label keeps as they are; everything else becomes an entity code `#NN;`
MERMAID_PLAIN = re.compile(r"[A-Za-z0-9 _.,:/+=()\-]")
MERMAID_LABEL = re.compile(r"[A-Za-z0-9 _.,:/+=()\-]*")


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" or char in BIDI_CONTROLS


def one_line(text: str) -> str:
    """Line breaks of every kind as spaces, other control characters as U+FFFD."""
    if text.isprintable():  # the common case, checked in C: no control or separator at all
        return text
    joined = " ".join(text.splitlines())
    return "".join(REPLACEMENT if _is_control(char) else char for char in joined)


def plain_text(text: str) -> str:
    """Text for a terminal or a plain-text page: one line, no control or escape sequences."""
    return one_line(text)


def plain_lines(text: str) -> str:
    """Multi-line text for a terminal: its lines kept, every other control character replaced."""
    return "\n".join(one_line(line) for line in text.splitlines())


# --- Markdown (GitHub) ------------------------------------------------------------------------


def _md_block_start(text: str) -> str:
    """A leading `#`, `-`, `1.` ... escaped, so text that starts a line stays a paragraph."""
    if text[:1] in MD_BLOCK_STARTS:
        return "\\" + text
    return MD_ORDERED_LIST.sub(r"\1\\\2", text, count=1)


def md_text(text: str) -> str:
    """Markdown text (also safe in a table cell): it renders as itself, markup-free, on one line.

    Markup characters are backslash-escaped, `&`, `<`, `>` become entities (no HTML, no
    comment, no `</details>`), `|` cannot end a cell, and a word joiner after `@`, `:` of `://`,
    `www` and `#` before a digit keeps GitHub from making a mention or a link.
    """
    escaped = one_line(text).strip().translate(MD_TABLE)
    return _md_block_start(_break_autolinks(escaped))


def _break_autolinks(text: str) -> str:
    if "@" in text or "://" in text or "#" in text or "www" in text.lower():
        return AUTOLINKS.sub(WORD_JOINER, text)
    return text


def md_code(text: str, *, in_table: bool = False) -> str:
    """Inline code that shows `text` exactly (on one line) and that nothing in it can end.

    The backtick run around it is longer than any run inside; inside a table cell `|` is
    escaped (GitHub splits cells before it finds code spans). Code spans hold no HTML, links or
    mentions.
    """
    body = one_line(text)
    if not body:
        return "` `"
    if in_table and "|" in body:
        body = body.replace("|", "\\|")
    if "`" not in body and body[0] != " ":
        return f"`{body}`"  # the common case
    runs = [len(run) for run in re.findall(r"`+", body)]
    fence = "`" * (max(runs, default=0) + 1)
    if body[0] == "`" or body[-1] == "`" or (body[0] == body[-1] == " " and body.strip()):
        body = f" {body} "  # CommonMark strips one space on each side
    return f"{fence}{body}{fence}"


def md_fence(text: str, info: str = "") -> str:
    """A fenced code block holding `text` verbatim: the fence is longer than any run inside."""
    lines = [plain_text(line) for line in text.splitlines()]
    runs = [len(run) for line in lines for run in re.findall(r"`+", line)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return "\n".join([fence + plain_text(info), *lines, fence])


# --- Slack mrkdwn ---------------------------------------------------------------------------


def slack_text(text: str) -> str:
    """Slack mrkdwn text on one line: no `<!channel>`, `<@U…>`, `<http…|x>`, bare link or code."""
    return _slack_escape(one_line(text).replace("`", SLACK_BACKTICK))


def _slack_escape(line: str) -> str:
    escaped = line.translate(SLACK_TABLE)
    if "://" in escaped or "www" in escaped.lower():
        return SLACK_AUTOLINKS.sub(WORD_JOINER, escaped)
    return escaped


def slack_lines(text: str) -> str:
    """A message for Slack mrkdwn (the bot's sentences holding foreign text), lines kept.

    No mention, link or control character can come from it; its backticks stay, since the
    bot's own sentences quote with them (foreign values go through `slack_text` first).
    """
    return "\n".join(_slack_escape(one_line(line)) for line in text.splitlines())


def slack_code(text: str) -> str:
    """Slack inline code that nothing in `text` can end (its backticks are look-alikes)."""
    return "`" + slack_text(text) + "`"


def slack_block(text: str) -> str:
    """The inside of a Slack code block: lines kept, ``` shown as ''', escaped."""
    lines = [one_line(line) for line in text.replace("```", "'''").splitlines()]
    return "\n".join(line.translate(SLACK_TABLE) for line in lines)


# --- Mermaid and HTML -----------------------------------------------------------------------


def mermaid_label(text: str) -> str:
    """The inside of a quoted Mermaid label: anything but plain characters as `#NN;` codes.

    No `"` can end the label, no newline or backtick can end the line or the fence, no `<` can
    make markup.
    """
    line = one_line(text)
    if MERMAID_LABEL.fullmatch(line):
        return line
    return "".join(char if MERMAID_PLAIN.fullmatch(char) else f"#{ord(char)};" for char in line)


def html_text(text: object) -> str:
    """Text (or an attribute value) for HTML: `&`, `<`, `>`, `"` and `'` as entities."""
    return html.escape(str(text), quote=True)
