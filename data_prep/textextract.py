"""Text out of HTML pages and fortune files, with the stdlib only.

Why: the offline sample corpus is Debian's translated documentation (HTML) and quotation files
(`fortune` format: entries separated by lines holding a single '%').
"""

from __future__ import annotations

from html.parser import HTMLParser


def _tags(text: str) -> frozenset[str]:
    return frozenset(text.split())


_BLOCK = _tags(
    "p div li dt dd td th tr table thead tbody ul ol dl h1 h2 h3 h4 h5 h6 blockquote section article "
    "header footer nav pre figure figcaption caption body html title hr"
)
_HEADING = _tags("h1 h2 h3 h4 h5 h6")
# Content that is not prose: code, tables of packages, navigation, tables of contents.
_SKIP_TAGS = _tags("pre script style head table nav svg math")
_SKIP_CLASSES = _tags("toc navheader navfooter list-of-tables list-of-figures list-of-examples")
_VOID = _tags("area base br col embed hr img input link meta param source track wbr")


class _SectionParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self._stack: list[tuple[str, bool]] = []  # (tag, skipping) for open non-void elements
        self._buffer: list[str] = []

    @property
    def _skipping(self) -> bool:
        return bool(self._stack) and self._stack[-1][1]

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        self._buffer = []
        if text:
            self.sections[-1].append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK:
            self._flush()
        if tag in _HEADING and not self._skipping and self.sections[-1]:
            self.sections.append([])
        if tag in _VOID:
            if tag == "br":
                self._buffer.append(" ")
            return
        classes = set((dict(attrs).get("class") or "").split())
        skip = self._skipping or tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES)
        self._stack.append((tag, skip))

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK:
            self._flush()
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_sections(html: str) -> list[list[str]]:
    """Paragraph texts of an HTML page, grouped by the heading they fall under.

    Block elements end a paragraph; inline markup (links, emphasis, inline code) stays part of it;
    whitespace collapses as a browser would; code blocks, tables, navigation and tables of contents
    are dropped. Each group starts at a heading (the heading text is its first paragraph).
    """
    parser = _SectionParser()
    parser.feed(html)
    parser.close()
    return [section for section in parser.sections if section]


def fortune_entries(text: str) -> list[str]:
    """Entries of a fortune file: blocks separated by lines holding only '%'."""
    entries, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip("\n"))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip("\n"))
    return [entry for entry in entries if entry.strip()]
