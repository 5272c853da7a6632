"""Hybrid retrieval over one index shard, and the fusion of the shards' results.

:class:`ShardIndex` holds a shard's chunks in memory: their embeddings (one
row each of a matrix, searched exactly: at tens of thousands of chunks per
shard a matrix product beats building an approximate graph) and BM25 postings,
updated in place as chunks come and go. The shard's durable copy is its keyed
state (:class:`dataflows.rag.steps.IndexShard`); this index is rebuilt from it when a shard opens.

BM25 is Lucene's variant with bm25s's defaults (``k1=1.5``, ``b=0.75``; terms
from :func:`dataflows.rag.text.terms`), with statistics (document count, average
length, document frequencies) of the shard: like a search engine's shard
without a global-statistics round, scores of different shards are comparable
only as far as the shards' statistics agree, which hash-spread documents make
close.

:func:`fuse` merges per-retriever rankings with weighted reciprocal rank
fusion. No Bytewax here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import log
from typing import Any

import numpy as np
from usearch.index import Index

__all__ = ["Fusion", "Hit", "IndexedChunk", "ShardIndex", "best_per_doc", "fuse"]

_BULK = 10_000  # chunks joining the approximate index at once, from which its build uses every core


@dataclass(frozen=True)
class IndexedChunk:
    chunk_id: str
    doc_id: str
    title: str
    text: str
    start: int  # character offsets of text in the document's text
    end: int
    metadata: Mapping[str, Any]
    vector: np.ndarray  # float32, L2-normalised
    terms: Sequence[str]  # BM25 terms of title and text


@dataclass(frozen=True)
class Hit:
    """A chunk one retriever found, with its score there."""

    chunk_id: str
    doc_id: str
    score: float
    start: int
    end: int
    title: str = ""
    text: str | None = None  # the shard's best hits carry their text, for answers


def _matches(metadata: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    """Each filter is a field and a value it must equal, or a list of values it must be one of."""
    for name, wanted in filters.items():
        value = metadata.get(name)
        if isinstance(wanted, list) and not isinstance(value, list):
            if value not in wanted:
                return False
        elif value != wanted:
            return False
    return True


@dataclass
class ShardIndex:
    """One shard's chunks: their vectors for dense search, their terms for BM25.

    Dense search is exact (every vector scored) below ``ann_min`` chunks; from there it asks
    an approximate index (usearch's HNSW graph, vectors quantised to int8) for
    ``ann_oversample`` times the candidates wanted and re-scores them exactly against the
    float32 vectors, so scores and ties are as exact search gives them and only a missed
    candidate can differ. The graph follows upserts and deletes; chunks added since the
    last search join it in one batch at the next (a restore adds every chunk, then the
    first search builds the graph). ``ann_min=0``: always exact. A filtered search is exact.
    """

    dim: int
    k1: float = 1.5
    b: float = 0.75
    ann_min: int = 20_000
    ann_oversample: int = 2
    _slots: dict[str, int] = field(default_factory=dict)
    _chunks: list[IndexedChunk | None] = field(default_factory=list)
    _free: list[int] = field(default_factory=list)
    _postings: dict[str, dict[int, int]] = field(default_factory=dict)
    _total_terms: int = 0

    def __post_init__(self) -> None:
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._lengths = np.zeros(0, dtype=np.float32)
        self._alive = np.zeros(0, dtype=bool)
        self._ann: Index | None = None
        self._ann_pending: dict[int, None] = {}  # slots added since the graph last caught up, in order

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self._slots

    def add(self, chunk: IndexedChunk) -> None:
        """Index ``chunk``, replacing a chunk with its id."""
        self.remove(chunk.chunk_id)
        slot = self._free.pop() if self._free else self._grow()
        self._slots[chunk.chunk_id] = slot
        self._chunks[slot] = chunk
        self._vectors[slot] = chunk.vector
        self._lengths[slot] = len(chunk.terms)
        self._alive[slot] = True
        if self._ann is not None:
            self._ann_pending[slot] = None
        self._total_terms += len(chunk.terms)
        for term, tf in Counter(chunk.terms).items():
            self._postings.setdefault(term, {})[slot] = tf

    def remove(self, chunk_id: str) -> None:
        slot = self._slots.pop(chunk_id, None)
        if slot is None:
            return
        chunk = self._chunks[slot]
        assert chunk is not None
        for term in set(chunk.terms):
            postings = self._postings[term]
            del postings[slot]
            if not postings:
                del self._postings[term]
        self._total_terms -= len(chunk.terms)
        self._chunks[slot] = None
        self._alive[slot] = False
        self._free.append(slot)
        if self._ann is not None and self._ann_pending.pop(slot, False) is False:
            self._ann.remove(slot)

    def _grow(self) -> int:
        slot = len(self._chunks)
        if slot == len(self._alive):
            capacity = max(64, 2 * slot)
            self._vectors = np.resize(self._vectors, (capacity, self.dim))
            self._lengths = np.resize(self._lengths, capacity)
            self._alive = np.concatenate([self._alive, np.zeros(capacity - slot, dtype=bool)])
        self._chunks.append(None)
        return slot

    def allowed(self, filters: Mapping[str, Any]) -> np.ndarray | None:
        """The slots whose chunk's metadata passes ``filters``; ``None`` (every chunk) when there are none."""
        if not filters:
            return None
        return np.fromiter(
            (c is not None and _matches(c.metadata, filters) for c in self._chunks), bool, len(self._chunks)
        )

    def dense(self, vector: np.ndarray, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        """The top ``k`` allowed slots by cosine similarity to ``vector`` (L2-normalised)."""
        vector = vector.astype(np.float32)
        if allowed is None and self.ann_min and len(self._slots) >= self.ann_min:
            slots = self._ann_candidates(vector, self.ann_oversample * k)
            scores = self._vectors[slots] @ vector
            return self._ranked(list(zip(slots.tolist(), scores.tolist(), strict=True)), k)
        n = len(self._chunks)
        scores = self._vectors[:n] @ vector
        return self._top(np.where(self._alive[:n] if allowed is None else allowed, scores, -np.inf), k)

    def _ann_candidates(self, vector: np.ndarray, count: int) -> np.ndarray:
        if self._ann is None:
            self._ann = Index(ndim=self.dim, metric="cos", dtype="i8", connectivity=16, expansion_add=64)
            self._ann_pending = dict.fromkeys(self._slots.values())
        if self._ann_pending:
            slots = np.fromiter(self._ann_pending, np.uint64, len(self._ann_pending))
            # A shard opened from its state builds the whole graph here: on every core (0), not just its worker's.
            threads = 0 if len(slots) >= _BULK else 1
            self._ann.add(slots, self._vectors[slots.astype(np.int64)], threads=threads)
            self._ann_pending.clear()
        self._ann.expansion_search = max(128, 2 * count)  # type: ignore[misc]  # usearch's setter is untyped
        found: np.ndarray = self._ann.search(vector, count, threads=1).keys
        return found.astype(np.int64)

    @property
    def ann_bytes(self) -> int:
        """Memory the approximate index holds (0 while dense search is exact)."""
        return 0 if self._ann is None else int(self._ann.memory_usage)

    def bm25(self, query_terms: Iterable[str], k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        """The top ``k`` allowed slots by BM25 score for ``query_terms`` (slots scoring 0 left out)."""
        n, count = len(self._chunks), len(self._slots)
        if not count:
            return []
        scores = np.zeros(n, dtype=np.float32)
        norm = self.k1 * (1 - self.b + self.b * self._lengths[:n] / (self._total_terms / count))
        for term in query_terms:
            postings = self._postings.get(term)
            if not postings:
                continue
            idf = log(1 + (count - len(postings) + 0.5) / (len(postings) + 0.5))
            slots = np.fromiter(postings.keys(), np.int64, len(postings))
            tf = np.fromiter(postings.values(), np.float32, len(postings))
            scores[slots] += idf * tf / (tf + norm[slots])
        ok = scores > 0 if allowed is None else allowed & (scores > 0)
        return self._top(np.where(ok, scores, -np.inf), k)

    def _top(self, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
        candidates = np.argpartition(-scores, k)[:k] if k < len(scores) else np.arange(len(scores))
        return self._ranked([(int(slot), float(scores[slot])) for slot in candidates if scores[slot] > -np.inf], k)

    def _ranked(self, found: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
        # Ties go by chunk id, not by slot: slots depend on the order chunks came in.
        return sorted(found, key=lambda hit: (-hit[1], self._chunks[hit[0]].chunk_id))[:k]  # type: ignore[union-attr]

    def hit(self, slot: int, score: float, with_text: bool) -> Hit:
        c = self._chunks[slot]
        assert c is not None
        return Hit(c.chunk_id, c.doc_id, score, c.start, c.end, c.title, c.text if with_text else None)


def best_per_doc(hits: Iterable[Hit]) -> list[Hit]:
    """``hits`` ranked by score, keeping each document's best chunk only."""
    seen: set[str] = set()
    out: list[Hit] = []
    for hit in sorted(hits, key=lambda h: -h.score):
        if hit.doc_id not in seen:
            seen.add(hit.doc_id)
            out.append(hit)
    return out


@dataclass(frozen=True)
class Fusion:
    """Weighted reciprocal rank fusion: a document scores ``weight / (rrf_k + rank)``
    in each ranking it is in (ranks from 1). The defaults are the best of the grid
    that ``python -m bench.rag`` scores on SciFact's train split."""

    dense_weight: float = 0.75
    bm25_weight: float = 1.0
    rrf_k: int = 5


def fuse(dense: Sequence[Hit], bm25: Sequence[Hit], fusion: Fusion) -> list[tuple[Hit, float]]:
    """Document rankings (one hit per document) fused, best first, with each
    document's fused score and the chunk that ranked it highest."""
    scores: dict[str, float] = {}
    # Each document's chunk: the one that brought it the most, one with its text first.
    best: dict[str, tuple[bool, float, Hit]] = {}
    for ranking, weight in ((dense, fusion.dense_weight), (bm25, fusion.bm25_weight)):
        for rank, hit in enumerate(ranking, 1):
            contribution = weight / (fusion.rrf_k + rank)
            scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + contribution
            candidate = (hit.text is not None, contribution, hit)
            if hit.doc_id not in best or candidate[:2] > best[hit.doc_id][:2]:
                best[hit.doc_id] = candidate
    ranked = sorted(scores, key=lambda doc: -scores[doc])
    return [(best[doc][2], scores[doc]) for doc in ranked]
