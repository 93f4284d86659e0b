"""MediaWiki markup to plain text in the spirit of WikiText (the embedded Wikipedia corpus).

Templates, references, tables, files, categories, comments and HTML go; links keep their visible label;
headings are kept as `` = Title = `` / `` = = Section = = `` lines; trailing reference sections (See also,
References, ...) and sections left empty are dropped. :func:`wikitext_to_plain` is the whole conversion;
the ``strip_*`` functions are its steps.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_RE = re.compile(r"<ref\b[^>]*/>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_DROPPED_ELEMENT_RE = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem|ce|hiero)\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_HTML_TAG_RE = re.compile(r"</?[a-zA-Z][^<>]*>")
_TEMPLATE_TOKENS_RE = re.compile(r"(?P<open>\{\{)|(?P<close>\}\})")
_TABLE_TOKENS_RE = re.compile(r"(?P<open>^[ \t]*\{\|)|(?P<close>^[ \t]*\|\})", re.M)
_LINK_TOKENS_RE = re.compile(r"(?P<open>\[\[)|(?P<close>\]\])")
_EXTERNAL_LINK_RE = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]+(?:\s+([^\]]*))?\]")
_BOLD_ITALIC_RE = re.compile(r"'{2,}")
_MAGIC_WORD_RE = re.compile(r"__[A-Z]+__")
_HEADING_RE = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_LIST_MARKER_RE = re.compile(r"^[*#:;]+\s*")
_SPACES_RE = re.compile(r"[ \t\u00a0]+")
_EMPTY_PARENS_RE = re.compile(r" ?\(\s*[,;:]?\s*\)")
_PARENS_LEAD_RE = re.compile(r"\((?:\s*[,;:])+\s*")
_TEMPLATE_ARG_SPLIT_RE = re.compile(r"\|(?![^\[]*\]\])")
_INTERLANGUAGE_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*:")

_DROPPED_LINK_NAMESPACES = ("file", "image", "media", "category")
_DROPPED_SECTIONS = frozenset(
    {
        "references",
        "notes",
        "footnotes",
        "citations",
        "sources",
        "bibliography",
        "further reading",
        "external links",
        "see also",
        "notes and references",
        "references and notes",
        "works cited",
    }
)
_DISAMBIGUATION_RE = re.compile(
    r"\{\{\s*(?:disambig\w*|dab|set index article|geodis|hndis|letter disambiguation)\s*[|}]", re.I
)
_CONVERT_RANGE_WORDS = frozenset({"to", "-", "–", "and", "or", "by", "x", "×", "+", "to(-)", "and(-)"})
_TEXT_TEMPLATES = frozenset({"nowrap", "nobr", "small", "smaller", "big", "smallcaps", "sc", "lang", "em"})


def _replace_balanced(text: str, tokens: re.Pattern[str], render: Callable[[str], str]) -> str:
    """Replace every outermost balanced span by ``render(inner text)``.

    ``tokens`` matches the opening delimiter in group ``open`` and the closing one in group ``close``
    (e.g. ``{{`` / ``}}``); nested spans stay inside their outer span's inner text. Unmatched closing
    delimiters are kept; an opening delimiter that is never closed is dropped and the scan goes on after it.
    """
    pieces: list[str] = []
    rest = text
    while True:
        depth = kept_until = inner_start = outer_start = 0  # kept_until: end of the text copied to pieces
        for match in tokens.finditer(rest):
            if match.group("open") is not None:
                if depth == 0:
                    pieces.append(rest[kept_until : match.start()])
                    outer_start, inner_start = match.start(), match.end()
                depth += 1
            elif depth > 0:
                depth -= 1
                if depth == 0:
                    pieces.append(render(rest[inner_start : match.start()]))
                    kept_until = match.end()
        if depth == 0:
            pieces.append(rest[kept_until:])
            return "".join(pieces)
        opening = tokens.match(rest, outer_start)  # unclosed: drop this opening delimiter, rescan after it
        assert opening is not None
        rest = rest[opening.end() :]


def _template_args(inner: str) -> tuple[str, list[str]]:
    """Name (lower case) and positional arguments of a template's inner text (nested templates rendered)."""
    parts = [part.strip() for part in _TEMPLATE_ARG_SPLIT_RE.split(strip_templates(inner))]
    positional = [part for part in parts[1:] if "=" not in part]
    return parts[0].lower(), positional


def _render_template(inner: str) -> str:
    """Visible text of the few inline templates whose text belongs to the sentence; ``""`` for the others.

    ``{{convert|55|to|80|cm|in}}`` -> ``"55 to 80 cm"``, ``{{convert|7|kg|lb}}`` -> ``"7 kg"``,
    ``{{lang|fr|mot}}`` / ``{{lang-fr|mot}}`` -> ``"mot"``, ``{{nowrap|text}}`` -> ``"text"``,
    ``{{!}}`` -> ``"|"``.
    """
    name = inner.split("|", 1)[0].strip().lower()
    if name == "!":
        return "|"
    if name not in _TEXT_TEMPLATES and name not in ("convert", "cvt") and not name.startswith("lang-"):
        return ""
    name, args = _template_args(inner)
    if name in ("convert", "cvt"):
        if len(args) >= 3 and args[1] in _CONVERT_RANGE_WORDS:
            return " ".join(args[:4])
        return " ".join(args[:2])
    if name == "lang":
        return args[1] if len(args) > 1 else ""
    return args[0] if args else ""


def strip_templates(text: str) -> str:
    """Remove ``{{...}}`` templates (nesting-aware), keeping the text of a few inline ones.

    See :func:`_render_template` for the templates whose text is kept (unit conversions, language tags,
    ``nowrap``); infoboxes, citations, navigation boxes and the like disappear.
    """
    return _replace_balanced(text, _TEMPLATE_TOKENS_RE, _render_template)


def strip_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables (nesting-aware; the delimiters must start a line, as in MediaWiki)."""
    return _replace_balanced(text, _TABLE_TOKENS_RE, lambda _inner: "")


def _render_link(inner: str) -> str:
    """Visible text of ``[[inner]]``: the label, or the target; ``""`` for files, categories, interwiki."""
    target, has_label, label = inner.partition("|")
    target = target.strip()
    namespace = target.lstrip(":").split(":", 1)[0].strip().lower() if ":" in target else ""
    if not target.startswith(":") and namespace in _DROPPED_LINK_NAMESPACES:
        return ""
    if has_label and label.strip():
        return strip_links(label)
    if _INTERLANGUAGE_RE.match(target):
        return ""
    if has_label:  # "pipe trick" [[Target (qualifier)|]] shows the target without the qualifier
        return re.sub(r"\s*\([^)]*\)$", "", target.lstrip(":"))
    return target.lstrip(":")


def strip_links(text: str) -> str:
    """Render internal links: ``[[target|label]]`` -> label, ``[[target]]`` -> target.

    ``[[File:...]]``, ``[[Image:...]]``, ``[[Media:...]]`` and ``[[Category:...]]`` (with any nested links in
    their captions) and label-less interlanguage links (``[[de:...]]``) are removed.
    """
    return _replace_balanced(text, _LINK_TOKENS_RE, _render_link)


def strip_external_links(text: str) -> str:
    """Render external links: ``[http://x label]`` -> label, ``[http://x]`` -> ``""`` (bare URLs stay)."""
    return _EXTERNAL_LINK_RE.sub(lambda match: match.group(1) or "", text)


def strip_html(text: str) -> str:
    """Remove comments, ``<ref>`` footnotes, formulas/galleries (with content) and other tags (not content)."""
    text = _COMMENT_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = _DROPPED_ELEMENT_RE.sub("", text)
    return _HTML_TAG_RE.sub("", text)


def wikitext_heading(title: str, level: int) -> str:
    """WikiText-2 style heading: level 1 -> ``" = Title = "``, level 2 -> ``" = = Title = = "``, ..."""
    marks = " ".join("=" * level)
    return f" {marks} {title} {marks} "


def _drop_sections(text: str) -> str:
    """Drop reference-type sections (References, Notes, External links, See also, ...) with their bodies.

    A dropped section runs until the next heading of the same or a higher level (fewer ``=``).
    """
    kept: list[str] = []
    dropping_level = 0  # 0: keeping; n: inside a dropped section of level n
    for line in text.split("\n"):
        heading = _HEADING_RE.match(line)
        if heading is not None:
            level = len(heading.group(1))
            if dropping_level and level <= dropping_level:
                dropping_level = 0
            if not dropping_level and heading.group(2).strip().lower() in _DROPPED_SECTIONS:
                dropping_level = level
        if not dropping_level:
            kept.append(line)
    return "\n".join(kept)


def _text_blocks(text: str) -> list[tuple[int, str]]:
    """Headings and text blocks of stripped markup as ``(level, text)``; level 0 is a paragraph / list item.

    As in MediaWiki, consecutive plain lines form one paragraph and a blank line ends it; every list item
    (``*``, ``#``, ``:``, ``;``) is its own block. Table residue lines (``|``, ``!``) and rules are dropped,
    runs of spaces collapsed and parentheses emptied by the stripping (``"( ; born 1947)"``) tidied.
    """
    blocks: list[tuple[int, str]] = []
    in_paragraph = False
    for raw_line in text.split("\n"):
        line = raw_line.strip()
        heading = _HEADING_RE.match(line)
        if heading is not None:
            title = _SPACES_RE.sub(" ", heading.group(2)).strip()
            if title:
                blocks.append((len(heading.group(1)), title))
            in_paragraph = False
            continue
        is_list_item = _LIST_MARKER_RE.match(line) is not None
        body = _EMPTY_PARENS_RE.sub("", _SPACES_RE.sub(" ", _LIST_MARKER_RE.sub("", line))).strip()
        body = _PARENS_LEAD_RE.sub("(", body)
        if not body or line.startswith(("|", "!", "----")):
            in_paragraph = False
        elif in_paragraph and not is_list_item:
            blocks[-1] = (0, f"{blocks[-1][1]} {body}")
        else:
            blocks.append((0, body))
            in_paragraph = not is_list_item
    return blocks


def _drop_empty_sections(blocks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Remove headings whose section holds no text (e.g. one that held only a table or a gallery)."""
    kept: list[tuple[int, str]] = []
    for level, text in blocks:
        if level:  # a heading closes the sections of the same or a deeper level before it
            while kept and kept[-1][0] >= level:
                kept.pop()
        kept.append((level, text))
    while kept and kept[-1][0]:
        kept.pop()
    return kept


def is_heading_line(line: str) -> bool:
    """Whether a line of cleaned text is a WikiText-style heading (``" = ... = "``); text lines never start
    with a space."""
    return line.startswith(" =")


def wikitext_to_plain(markup: str) -> str:
    """Plain WikiText-like text of one article's MediaWiki markup: one line per heading/paragraph/list item.

    Order matters: tags and footnotes go first (so that headings are clean), then reference sections,
    templates (which may hold tables and links), tables, links, external links, bold/italic quotes, and
    finally the line cleanup and HTML entities (decoded last so that an escaped ``&lt;`` never turns into a
    tag).
    """
    text = strip_html(markup)
    text = _drop_sections(text)
    text = strip_templates(text)
    text = strip_tables(text)
    text = strip_links(text)
    text = strip_external_links(text)
    text = _BOLD_ITALIC_RE.sub("", text)
    text = _MAGIC_WORD_RE.sub("", text)
    text = html.unescape(text)
    return "\n".join(
        wikitext_heading(body, level) if level else body for level, body in _drop_empty_sections(_text_blocks(text))
    )




def is_disambiguation(markup: str) -> bool:
    """Whether a page's markup marks it as a disambiguation page."""
    return _DISAMBIGUATION_RE.search(markup) is not None
