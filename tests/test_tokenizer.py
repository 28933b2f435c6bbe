"""modules/tokenization_clip.py: ids identical to the reference CLIP tokenizer."""
from __future__ import annotations

import random

import pytest
import torch

from modules.tokenization_clip import SimpleTokenizer, get_tokenizer, tokenize, tokenize_for_model

open_clip = pytest.importorskip("open_clip")

SOT, EOT = 49406, 49407

FRAGMENTS = [
    # plain captions, mixed case, contractions
    "a man is playing a guitar", "A Woman Is Cooking", "the dog's ball", "it isn't here",
    "they're running", "we've been there", "I'm happy", "you'll see", "he'd go", "DON'T STOP",
    "It'S", "o'clock", "rock'n'roll", "'quoted'", "\"double quoted\"",
    # numbers and punctuation
    "3 cats", "1999", "3.14159", "$100.00", "50%", "#hashtag", "@user", "e-mail", "well...",
    "what?!", "(brackets) [square] {curly}", "a/b\\c", "x+y=z", "snake_case_name", "CamelCase",
    "~~~", "!!!", "--", "1st 2nd 3rd", "10,000", "12:30pm", "A-1", "v2.0",
    # accents and non-Latin scripts
    "café", "naïve résumé", "Ångström", "Straße", "ÉCOLE", "mañana", "crème brûlée",
    "日本語のテキスト", "中文字符", "한국어", "Русский текст", "Ελληνικά", "עברית", "العربية",
    "हिन्दी", "ไทย", "Tiếng Việt",
    # emoji and symbols
    "😀", "a 🐶 and a 🐱", "👍🏽", "🇫🇷", "♥", "©®™", "→ ← ↑", "€£¥", "°C", "½", "x²",
    # HTML entities (unescaped twice) and mojibake that ftfy repairs
    "tom &amp; jerry", "it&#39;s", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;", "&quot;hi&quot;",
    "&nbsp;", "&#x27;", "&eacute;", "cafÃ©", "donâ€™t", "curly ’quotes’", "“fancy”",
    # whitespace runs, tabs, newlines, unusual spaces
    "  leading", "trailing  ", "a\tb", "line\nbreak", "many     spaces", "\r\n", "a\u00a0b",
    "wide\u3000space", "em\u2003space", "zero\u200bwidth",
]

EDGE_CASES = [
    "", " ", "\t\n", "a", "A", "'", "'s", "''", "&", "&&", "<", ">", "<b>", "0", "00", "007",
    "x" * 500,  # one very long word
    "word " * 200,  # many words: truncated
    "1 2 3 4 5 6 7 8 9 " * 20,
    "日本" * 100,
    "😀" * 60,
]


def _generated_texts(count: int = 240, seed: int = 0) -> list:
    """Deterministic mixtures of the fragments, some long enough to be truncated."""
    rng = random.Random(seed)
    separators = [" ", "  ", "\t", "\n", "", ", ", " - ", ". "]
    texts = []
    for i in range(count):
        n = rng.choice([1, 2, 3, 5, 8]) if i % 10 else rng.randint(20, 40)
        parts = [rng.choice(FRAGMENTS) for _ in range(n)]
        text = "".join(p + rng.choice(separators) for p in parts)
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        texts.append(text)
    return texts


ALL_TEXTS = FRAGMENTS + EDGE_CASES + _generated_texts()


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


def test_corpus_is_large_and_varied():
    assert len(ALL_TEXTS) >= 300
    assert len(set(ALL_TEXTS)) > 250


def test_ids_identical_to_reference(reference):
    expected = reference(ALL_TEXTS)
    actual = tokenize(ALL_TEXTS)
    assert actual.dtype == torch.long
    assert actual.shape == (len(ALL_TEXTS), 77)
    mismatched = [t for t, a, e in zip(ALL_TEXTS, actual, expected) if not torch.equal(a, e)]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]!r}"
    # The corpus exercises truncation: some rows end with EOT at the last position.
    assert (actual[:, -1] == EOT).sum() >= 5


def test_encode_identical_without_special_tokens(reference):
    ours = get_tokenizer()
    for text in ALL_TEXTS[:120]:
        assert ours.encode(text) == reference.encode(text), text


def test_other_context_lengths(reference):
    texts = ALL_TEXTS[::7]
    for length in (16, 32):
        assert torch.equal(tokenize(texts, context_length=length), reference(texts, context_length=length))


def test_single_string_and_structure():
    tokens = tokenize("a photo of a cat")
    assert tokens.shape == (1, 77)
    row = tokens[0].tolist()
    eot_at = row.index(EOT)
    assert row[0] == SOT and eot_at == 6 and all(t == 0 for t in row[eot_at + 1:])
    assert tokenize([]).shape == (0, 77)


def test_decode_round_trip():
    tokenizer = get_tokenizer()
    text = "a man's dog, running fast!"
    assert tokenizer.decode(tokenizer.encode(text)).strip() == "a man 's dog , running fast !"
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (SOT, EOT)


def test_special_token_text_maps_to_special_ids():
    """OpenAI's tokenizer maps literal <|startoftext|> / <|endoftext|> to their ids."""
    assert get_tokenizer().encode("a <|endoftext|> b <|startoftext|>") == [
        get_tokenizer().encode("a")[0], EOT, get_tokenizer().encode("b")[0], SOT,
    ]


def test_truncation_and_error():
    long_text = "word " * 200
    tokens = tokenize(long_text)
    assert tokens[0, 0] == SOT and tokens[0, -1] == EOT
    assert (tokens[0, 1:-1] == get_tokenizer().encode("word")[0]).all()
    with pytest.raises(ValueError, match="too long for context length 77"):
        tokenize(["short", long_text], truncate=False)
    # Exactly 77 tokens fits without truncation.
    fits = "word " * 75
    assert tokenize(fits, truncate=False)[0, -1] == EOT


def test_tokenize_for_model():
    texts = ["a photo of a cat", "word " * 100, ""]
    tokens = tokenize_for_model(texts, max_words=32)
    assert tokens.shape == (3, 32) and tokens.dtype == torch.long
    short, long, empty = tokens.tolist()
    body = get_tokenizer().encode("a photo of a cat")
    assert short[: len(body) + 2] == [SOT] + body + [EOT]
    assert all(t == 0 for t in short[len(body) + 2:])
    assert long[0] == SOT and long[-1] == EOT and len(set(long[1:-1])) == 1  # 30 words kept
    assert empty[:2] == [SOT, EOT] and all(t == 0 for t in empty[2:])
    # The same ids as tokenize() whenever nothing is cut.
    assert torch.equal(tokenize_for_model(texts[0], max_words=32), tokenize(texts[0], context_length=32))
    # EOT is always the row's largest id, so encode_text's argmax finds it.
    assert (tokens.argmax(dim=-1) == torch.tensor([len(body) + 1, 31, 1])).all()
    assert tokenize_for_model("anything", max_words=2).tolist() == [[SOT, EOT]]
    with pytest.raises(ValueError):
        tokenize_for_model("x", max_words=1)


def test_custom_bpe_path_and_cache():
    from modules.tokenization_clip import default_bpe_path

    tokenizer = SimpleTokenizer(default_bpe_path())
    assert tokenizer.encode("hello world") == get_tokenizer().encode("hello world")
    assert tokenizer.cache["hello"] == "hello</w>"  # BPE results are memoised per word
