"""Text for retrieval: BM25 terms, token-window chunks with character offsets, sentences.

- :class:`Analyzer`: what BM25 counts. Lowercased words of ``min_chars`` or
  more word characters, a stop-word list dropped, stemmed with a Snowball
  stemmer; a document's terms are its title's, counted ``title_weight``
  times, and its text's. :data:`ANALYZER` is the one the dataflow uses (chosen
  on SciFact's train split: ``python -m scripts.tune_rag bm25``);
  :func:`terms` and :func:`document_terms` are its methods.
- :class:`Chunker`: windows of ``chunk_tokens`` tokens of the embedding model's
  own tokenizer, overlapping by ``overlap_tokens``; each chunk keeps the
  character offsets of its text in the document, for citations.
- :func:`sentences`: sentence spans (character offsets) for extractive answers.

No Bytewax here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import Stemmer
from bm25s.stopwords import STOPWORDS_EN, STOPWORDS_EN_PLUS

__all__ = ["ANALYZER", "STOPWORDS", "Analyzer", "Chunk", "Chunker", "document_terms", "sentences", "terms"]

# Lucene's English stop words (33, bm25s's "en"); NLTK's English list (179, bm25s's "en_plus").
STOPWORDS: dict[str, frozenset[str]] = {
    "lucene": frozenset(STOPWORDS_EN),
    "nltk": frozenset(STOPWORDS_EN_PLUS),
    "none": frozenset(),
}


@cache
def _word_pattern(min_chars: int) -> re.Pattern[str]:
    return re.compile(rf"(?u)\b\w{{{min_chars},}}\b")


@cache
def _stemmer(algorithm: str) -> Callable[[str], str]:
    if not algorithm:
        return str
    return lru_cache(maxsize=200_000)(Stemmer.Stemmer(algorithm).stemWord)


@dataclass(frozen=True)
class Analyzer:
    """How text becomes BM25 terms: words of at least ``min_chars`` word characters,
    lowercased, the ``stopwords`` list (a key of :data:`STOPWORDS`) dropped, stemmed with
    PyStemmer's ``stemmer`` algorithm (empty: not stemmed)."""

    # The defaults were chosen on SciFact's train split (python -m scripts.tune_rag bm25): no stop
    # words (BM25's IDF weighs them down), single characters kept ("type 2", "IL-6"), the title
    # counted three times. bm25s's defaults are Analyzer("lucene", "english", 2, 1).
    stopwords: str = "none"
    stemmer: str = "english"
    min_chars: int = 1
    title_weight: int = 3  # a document counts its title's terms this many times

    def __post_init__(self) -> None:
        if self.stopwords not in STOPWORDS:
            raise ValueError(f"stopwords is one of {sorted(STOPWORDS)}, got {self.stopwords!r}")
        if self.stemmer and self.stemmer not in Stemmer.algorithms():
            raise ValueError(f"stemmer is empty or one of PyStemmer's algorithms, got {self.stemmer!r}")
        if self.min_chars < 1 or self.title_weight < 0:
            raise ValueError(f"need min_chars >= 1, title_weight >= 0; got {self.min_chars}, {self.title_weight}")

    def terms(self, text: str) -> list[str]:
        """BM25 terms of ``text``, in order, repeats kept."""
        stop, stem = STOPWORDS[self.stopwords], _stemmer(self.stemmer)
        return [stem(word) for word in _word_pattern(self.min_chars).findall(text.lower()) if word not in stop]

    def document_terms(self, title: str, text: str) -> list[str]:
        """BM25 terms of a document: its title's, ``title_weight`` times, then its text's."""
        return self.terms(title) * self.title_weight + self.terms(text)


ANALYZER = Analyzer()
terms = ANALYZER.terms
document_terms = ANALYZER.document_terms


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
