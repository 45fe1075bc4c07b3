import pytest
from open_clip.tokenizer import SimpleTokenizer

from clipid.data.captions import CaptionCleaner

TOKENIZER = SimpleTokenizer()


def cleaner(**kw) -> CaptionCleaner:
    return CaptionCleaner(encode=TOKENIZER.encode, **kw)


@pytest.mark.parametrize("raw, clean, fix", [
    ("<b>Red</b> shirt<br/>", "red shirt", "markup"),
    ("Black &amp; white dress", "black & white dress", "markup"),
    ("Blue&nbsp;jeans", "blue jeans", "markup"),
    ("red shirt 👗✨", "red shirt", "emoji"),
    ("love it ❤️ red", "love it red", "emoji"),
    ("  red \t shirt\n\n", "red shirt", "whitespace"),
    ("red red shirt", "red shirt", "repeated_words"),
    ("Red red, RED shirt", "red shirt", "repeated_words"),
    ("ＲＥＤ shirt", "red shirt", "unicode"),
    ("RED Shirt", "red shirt", "casing"),
])
def test_rules(raw, clean, fix):
    c = cleaner()
    assert c.clean(raw) == clean
    assert c.counts[fix] == 1


def test_clean_caption_is_not_counted_as_fixed():
    c = cleaner()
    assert c.clean("a red shirt") == "a red shirt"
    summary = c.summary()
    assert summary["captions"] == 1
    assert sum(v for k, v in summary.items() if k != "captions") == 0


def test_repeated_words_keep_distinct_neighbours():
    assert cleaner().clean("bye bye-bye now") == "bye bye-bye now"


def test_empty_filled_from_attributes_then_generic():
    c = cleaner(noun="hand")
    filled = c.clean("  <p></p> 🔥 ", "Navy T-Shirt with a star logo")
    assert filled == "navy t-shirt with a star logo"
    assert c.clean("", "") == "a photo of a hand"
    assert c.counts["filled_from_attributes"] == 1
    assert c.counts["filled_generic"] == 1


@pytest.mark.parametrize("casing, expected", [("lower", "red shirt. nice"),
                                              ("sentence", "Red shirt. nice"),
                                              ("keep", "RED shirt. Nice")])
def test_casing_policy(casing, expected):
    assert cleaner(casing=casing).clean("RED shirt. Nice") == expected


def test_truncated_to_context_at_word_boundary():
    c = cleaner(context_length=10)  # 8 tokens for the text
    raw = "a long red cotton shirt with white stripes and a small star logo on the chest"
    out = c.clean(raw)
    assert len(TOKENIZER.encode(out)) <= 8
    assert raw.startswith(out) and raw[len(out)] == " "
    assert len(TOKENIZER.encode(out + " " + raw[len(out):].split()[0])) > 8  # longest that fits
    assert c.counts["truncated"] == 1


def test_single_overlong_word_is_cut():
    c = cleaner(context_length=6)
    out = c.clean("supercalifragilisticexpialidocious" * 3)
    assert out and len(TOKENIZER.encode(out)) <= 4
