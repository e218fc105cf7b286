"""Paragraph cleaning for the offline sample corpus: normalize, filter, deduplicate.

Why: documentation packages mix prose with commands, file listings and tables; quotation files carry
ASCII art and terminal overstrike. A language-model corpus wants the prose only.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
# A line that reads like a shell session, a prompt, a config or code rather than prose.
_COMMAND_LINE = re.compile(
    r"""^\s*(?:[$#%>]\s|>>>|\w+@[\w.-]+[:~]|sudo\s|apt(?:-get)?\s|dpkg\s|cd\s|ls\s|cat\s|echo\s|export\s
        |[A-Za-z_][\w.]*\s*=\s*\S|\S+\(\)\s*[{;]|[{}]\s*$|</?[a-z]+[ >]|\#!|-{1,2}[a-z][\w-]*\s)""",
    re.VERBOSE,
)
_CODE_CHARS = set("{}[]<>|\\=;$#_~^`*@")


@dataclass(frozen=True)
class ParagraphFilter:
    """Keep a paragraph only if it looks like natural prose.

    min_chars: shorter paragraphs carry too little text and defeat the language check.
    min_letter_ratio: letters over non-space characters; rejects numbers, art and listings.
    max_code_char_ratio: share of characters typical of code, paths and markup.
    """

    min_chars: int = 40
    max_chars: int = 20_000
    min_letter_ratio: float = 0.75
    max_code_char_ratio: float = 0.03

    def __call__(self, paragraph: str) -> bool:
        if not self.min_chars <= len(paragraph) <= self.max_chars:
            return False
        chars = [c for c in paragraph if not c.isspace()]
        letters = sum(c.isalpha() for c in chars)
        if letters < self.min_letter_ratio * len(chars):
            return False
        if sum(c in _CODE_CHARS for c in chars) > self.max_code_char_ratio * len(chars):
            return False
        return not any(_COMMAND_LINE.match(line) for line in paragraph.split("\n"))


def normalize_paragraph(text: str) -> str:
    """NFC, no control characters or overstrike, single spaces, no blank or padded lines."""
    text = _OVERSTRIKE.sub("", text)
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub(" ", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def dedup_key(paragraph: str) -> bytes:
    """Case- and whitespace-insensitive identity of a paragraph, for exact deduplication."""
    return hashlib.blake2b(" ".join(paragraph.casefold().split()).encode(), digest_size=16).digest()
