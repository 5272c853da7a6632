"""Text for retrieval: BM25 terms, token-window chunks with character offsets, sentences.

- :func:`terms`: what BM25 counts. Lowercased words of two or more word
  characters, Lucene's English stop words dropped, Snowball-stemmed: the
  defaults of bm25s, so scores can be checked against it.
- :class:`Chunker`: windows of ``chunk_tokens`` tokens of the embedding model's
  own tokenizer, overlapping by ``overlap_tokens``; each chunk keeps the
  character offsets of its text in the document, for citations.
- :func:`sentences`: sentence spans (character offsets) for extractive answers.

No Bytewax here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import Stemmer
from bm25s.stopwords import STOPWORDS_EN

__all__ = ["Chunk", "Chunker", "sentences", "terms"]

_WORD = re.compile(r"(?u)\b\w\w+\b")
_STOPWORDS = frozenset(STOPWORDS_EN)
_stem = lru_cache(maxsize=200_000)(Stemmer.Stemmer("english").stemWord)


def terms(text: str) -> list[str]:
    """BM25 terms of ``text``, in order, repeats kept."""
    return [_stem(word) for word in _WORD.findall(text.lower()) if word not in _STOPWORDS]


@dataclass(frozen=True)
class Chunk:
    """Characters ``start:end`` of a document's text."""

    index: int
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Chunker:
    """Splits text into windows of tokens of ``tokenizer`` (a Hugging Face fast
    tokenizer), ``overlap_tokens`` shared by neighbours."""

    tokenizer: Any
    chunk_tokens: int = 256
    overlap_tokens: int = 32

    def __post_init__(self) -> None:
        if not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise ValueError(
                f"need 0 <= overlap_tokens < chunk_tokens, got {self.overlap_tokens} and {self.chunk_tokens}"
            )

    def chunks(self, text: str) -> list[Chunk]:
        """The chunks of ``text``: none for text without tokens."""
        # Longer than the model reads, by design: verbose=False keeps the tokenizer from warning so.
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = encoded["offset_mapping"]
        step = self.chunk_tokens - self.overlap_tokens
        out: list[Chunk] = []
        for first in range(0, len(offsets), step):
            last = min(first + self.chunk_tokens, len(offsets)) - 1
            start, end = offsets[first][0], offsets[last][1]
            out.append(Chunk(len(out), start, end, text[start:end]))
            if last == len(offsets) - 1:
                break
        return out


# A sentence ends at . ! or ? followed by white space and a capital, digit or opening bracket/quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'])")


def sentences(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``, white space trimmed."""
    spans: list[tuple[int, int]] = []
    start = 0
    for match in [*_SENTENCE_END.finditer(text), None]:
        end = len(text) if match is None else match.start()
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        if match is not None:
            start = match.end()
    return spans
