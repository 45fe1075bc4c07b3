"""Caption cleaning: scraped captions in, one clean caption per image out.

Each rule is counted, so ``metrics/captions.json`` says how dirty the source was.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["CaptionCleaner", "FIXES"]

FIXES = ("unicode", "markup", "emoji", "whitespace", "repeated_words", "casing",
         "filled_from_attributes", "filled_generic", "truncated")

_TAG = re.compile(r"<[^>\n]{0,200}>")
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\S+")
# Emoji and pictographs that are not category 'So' (keycaps, flags' regional indicators are 'So').
_EMOJI_EXTRA = {0x200D, 0x20E3, 0xFE0E, 0xFE0F}


def _is_emoji(ch: str) -> bool:
    cp = ord(ch)
    return (unicodedata.category(ch) in ("So", "Cs", "Co") or cp in _EMOJI_EXTRA
            or 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F)


def _strip_word(word: str) -> str:
    return word.strip(".,;:!?\"'()[]").lower()


@dataclass
class CaptionCleaner:
    """Cleans one caption at a time and counts the fixes it made."""

    encode: Callable[[str], list[int]]  # text -> BPE tokens, no start/end markers
    context_length: int = 77
    casing: Literal["lower", "sentence", "keep"] = "lower"
    fallback: str = "a photo of a {noun}"
    noun: str = "garment"
    counts: Counter = field(default_factory=Counter)

    def clean(self, raw: str, attributes: str = "") -> str:
        text = raw or ""
        text = self._fix(text, unicodedata.normalize("NFKC", text), "unicode")
        unescaped = html.unescape(_TAG.sub(" ", html.unescape(text)))
        text = self._fix(text, unescaped, "markup")
        text = self._fix(text, "".join(" " if _is_emoji(c) else c for c in text), "emoji")
        # Control characters (tabs, newlines, zero-width) count as whitespace noise.
        spaced = _SPACE.sub(" ", "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c
                                         for c in text)).strip()
        text = self._fix(text, spaced, "whitespace", compare=lambda a, b: a.strip() != b)
        text = self._fix(text, self._drop_repeats(text), "repeated_words")
        if not text:
            if attributes.strip():
                text = attributes.strip()
                self.counts["filled_from_attributes"] += 1
            else:
                text = self.fallback.format(noun=self.noun)
                self.counts["filled_generic"] += 1
        text = self._fix(text, self._case(text), "casing")
        text = self._fix(text, self._truncate(text), "truncated")
        self.counts["captions"] += 1
        return text

    def _fix(self, before: str, after: str, rule: str,
             compare: Callable[[str, str], bool] = lambda a, b: a != b) -> str:
        if compare(before, after):
            self.counts[rule] += 1
        return after

    @staticmethod
    def _drop_repeats(text: str) -> str:
        """'red red  shirt Shirt' -> 'red shirt': immediate repeats, case and punctuation aside."""
        kept: list[str] = []
        for word in text.split(" "):
            if kept and _strip_word(word) and _strip_word(word) == _strip_word(kept[-1]):
                continue
            kept.append(word)
        return " ".join(kept)

    def _case(self, text: str) -> str:
        if self.casing == "lower":
            return text.lower()
        if self.casing == "sentence":
            lowered = text.lower()
            return lowered[:1].upper() + lowered[1:]
        return text

    def _truncate(self, text: str) -> str:
        """Cut at a word boundary so the caption fits the text tower with its start/end tokens."""
        budget = self.context_length - 2
        if len(self.encode(text)) <= budget:
            return text
        words = text.split(" ")
        lo, hi = 0, len(words)  # binary search: the longest word prefix that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.encode(" ".join(words[:mid]))) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            return " ".join(words[:lo])
        cut = words[0]  # one word longer than the context: cut it by characters
        while cut and len(self.encode(cut)) > budget:
            cut = cut[: len(cut) * budget // len(self.encode(cut)) or len(cut) - 1]
        return cut

    def summary(self) -> dict[str, int]:
        return {"captions": self.counts["captions"], **{f: self.counts[f] for f in FIXES}}
