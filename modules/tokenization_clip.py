"""OpenAI CLIP's byte-level BPE tokenizer, token-for-token identical to ``clip.tokenize``.

Text is cleaned (ftfy, HTML entities unescaped twice, whitespace runs collapsed,
lower-cased), split with CLIP's regex into words, contractions, single digits and
punctuation runs, then each piece is mapped byte-by-byte to printable unicode characters
and merged with the 48,894 BPE merges of ``bpe_simple_vocab_16e6.txt.gz``.
"""
from __future__ import annotations

import gzip
import html
import os
from functools import lru_cache
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import regex

if TYPE_CHECKING:
    import torch

__all__ = ["SimpleTokenizer", "VOCAB_SIZE", "tokenize", "tokenize_for_model", "token_id_matrix", "default_bpe_path",
           "get_tokenizer"]

SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"

# OpenAI's vocabulary: 256 byte symbols, the same with an end-of-word marker, then merges.
_NUM_MERGES = 49152 - 256 - 2
#: token ids are 0 .. VOCAB_SIZE - 1: the byte symbols, the same with </w>, the merges, SOT, EOT
VOCAB_SIZE = 2 * 256 + _NUM_MERGES + 2


def default_bpe_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the rest (whitespace, controls) are moved to
    code points 256+ so that no BPE symbol is whitespace.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def _symbol_pairs(word: Tuple[str, ...]) -> set:
    return set(zip(word[:-1], word[1:]))


def basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    # Twice, because scraped captions are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    return regex.sub(r"\s+", " ", text).strip()


class SimpleTokenizer:
    """CLIP's BPE tokenizer: ``encode(text) -> ids`` and ``decode(ids) -> text``."""

    def __init__(self, bpe_path: Optional[str] = None) -> None:
        bpe_path = bpe_path or default_bpe_path()
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The first line is a version header.
        merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT_TEXT, EOT_TEXT]
        self.encoder: Dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: Dict[int, str] = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks: Dict[Tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.cache: Dict[str, str] = {SOT_TEXT: SOT_TEXT, EOT_TEXT: EOT_TEXT}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.sot_token_id = self.encoder[SOT_TEXT]
        self.eot_token_id = self.encoder[EOT_TEXT]
        self.vocab_size = len(self.encoder)

    def bpe(self, token: str) -> str:
        """Byte-mapped word -> its BPE symbols joined by spaces (last one ends in ``</w>``)."""
        if token in self.cache:
            return self.cache[token]
        word: Tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        if len(word) == 1:
            return word[0]
        while len(word) > 1:
            pairs = _symbol_pairs(word)
            # Apply the earliest-learned merge present in the word, everywhere it occurs.
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: List[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> List[int]:
        """Text -> BPE token ids, without SOT/EOT."""
        text = whitespace_clean(basic_clean(text)).lower()
        ids: List[int] = []
        for piece in self.pat.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped).split(" "))
        return ids

    def decode(self, tokens: Iterable[int]) -> str:
        """Token ids -> text (words separated by spaces, as CLIP's decoder does)."""
        text = "".join(self.decoder[int(t)] for t in tokens)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer (loading the merges takes about half a second)."""
    return SimpleTokenizer()


def _as_list(texts: Union[str, Sequence[str]]) -> List[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def tokenize(
    texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = True
) -> torch.Tensor:
    """Texts -> LongTensor (n, context_length): SOT, tokens, EOT, zero padding.

    Too long with ``truncate``: the first ``context_length`` ids are kept and the last one
    becomes EOT (OpenAI's behaviour); without it, ValueError.
    """
    import torch  # here, so that the library's text queries (token_id_matrix) need no torch

    tokenizer = get_tokenizer()
    texts = _as_list(texts)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tokenizer.sot_token_id] + tokenizer.encode(text) + [tokenizer.eot_token_id]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"Input {text!r} is too long for context length {context_length}")
            ids = ids[:context_length]
            ids[-1] = tokenizer.eot_token_id
        result[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result


def token_id_matrix(texts: Union[str, Sequence[str]], max_words: int = 32) -> np.ndarray:
    """Texts -> int64 array (n, max_words) as CLIP4Clip feeds the text encoder:
    SOT + the first ``max_words - 2`` tokens + EOT, zero-padded."""
    if max_words < 2:
        raise ValueError(f"max_words must be at least 2 (SOT and EOT), got {max_words}")
    tokenizer = get_tokenizer()
    texts = _as_list(texts)
    result = np.zeros((len(texts), max_words), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)[: max_words - 2]
        ids = [tokenizer.sot_token_id] + ids + [tokenizer.eot_token_id]
        result[i, : len(ids)] = ids
    return result


def tokenize_for_model(texts: Union[str, Sequence[str]], max_words: int = 32) -> torch.Tensor:
    """:func:`token_id_matrix` as a LongTensor (n, max_words)."""
    import torch

    return torch.from_numpy(token_id_matrix(texts, max_words))
