"""Hybrid retrieval over one index shard, and the fusion of the shards' results.

:class:`ShardIndex` holds a shard's chunks in memory: their embeddings (one
row each of a matrix, searched exactly: at tens of thousands of chunks per
shard a matrix product beats building an approximate graph) and BM25 postings,
updated in place as chunks come and go. The shard's durable copy is its keyed
state (:class:`dataflows.rag.steps.IndexShard`); this index is rebuilt from it when a shard opens.

BM25 is Lucene's variant and ranks documents, not chunks: a document's terms
are those of its title and of the text its chunks cover (each character once,
overlaps included once), by :class:`dataflows.rag.text.Analyzer`, indexed at its
first chunk's slot, which is the document's BM25 hit (whole documents scored
better than their chunks on SciFact's train split: ``python -m scripts.tune_rag``).
A changed document's entry is rebuilt at the next search. Statistics (document
count, average length, document frequencies) are the shard's: like a search
engine's shard without a global-statistics round, scores of different shards
are comparable only as far as the shards' statistics agree, which hash-spread
documents make close.

:func:`fuse` merges per-retriever rankings with weighted reciprocal rank fusion
or distribution-based score fusion (:class:`Fusion`); :func:`rank` is what a
query's gathered shard hits become. No Bytewax here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from math import log
from typing import Any

import numpy as np
from usearch.index import Index

from dataflows.rag.text import ANALYZER, Analyzer

__all__ = [
    "FUSION_METHODS",
    "Fusion",
    "Hit",
    "IndexedChunk",
    "ShardIndex",
    "best_per_doc",
    "covered_text",
    "dbsf_normalise",
    "fuse",
    "rank",
]

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


def covered_text(chunks: Sequence[IndexedChunk]) -> str:
    """The text a document's chunks cover, each character once: the chunks are in order
    of their offsets and overlap (a gap between two becomes a space)."""
    parts, end = [], None
    for chunk in chunks:
        if end is None or chunk.start >= end:
            parts.append(chunk.text if end is None or chunk.start == end else " " + chunk.text)
        else:
            parts.append(chunk.text[end - chunk.start :])
        end = chunk.end if end is None else max(end, chunk.end)
    return "".join(parts)


@dataclass
class ShardIndex:
    """A shard's chunks: vectors per chunk, BM25 per document (see the module's docstring).

    Dense search is exact (every vector scored) below ``ann_min`` chunks; from there it asks
    an approximate index (usearch's HNSW graph, vectors quantised to int8) for
    ``ann_oversample`` times the candidates wanted and re-scores them exactly against the
    float32 vectors, so scores and ties are as exact search gives them and only a missed
    candidate can differ. The graph follows upserts and deletes; chunks added since the
    last search join it in one batch at the next (a restore adds every chunk, then the
    first search builds the graph). ``ann_min=0``: always exact. A filtered search is exact.
    """

    dim: int
    k1: float = 1.8  # chosen with ANALYZER on SciFact's train split (python -m scripts.tune_rag bm25)
    b: float = 0.75
    analyzer: Analyzer = ANALYZER
    ann_min: int = 20_000
    ann_oversample: int = 2
    _slots: dict[str, int] = field(default_factory=dict)
    _chunks: list[IndexedChunk | None] = field(default_factory=list)
    _free: list[int] = field(default_factory=list)
    # BM25 over documents: a document's postings and length sit at the slot of its first chunk.
    _postings: dict[str, dict[int, int]] = field(default_factory=dict)
    _total_terms: int = 0
    _doc_chunks: dict[str, set[int]] = field(default_factory=dict)  # document id -> its chunks' slots
    _doc_terms: dict[str, tuple[int, Counter[str]]] = field(default_factory=dict)  # -> (slot, term counts)
    _stale: set[str] = field(default_factory=set)  # documents whose BM25 entry waits for the next search

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
        self._alive[slot] = True
        if self._ann is not None:
            self._ann_pending[slot] = None
        self._unindex_doc(chunk.doc_id)
        self._doc_chunks.setdefault(chunk.doc_id, set()).add(slot)

    def remove(self, chunk_id: str) -> None:
        slot = self._slots.pop(chunk_id, None)
        if slot is None:
            return
        chunk = self._chunks[slot]
        assert chunk is not None
        self._unindex_doc(chunk.doc_id)
        held = self._doc_chunks[chunk.doc_id]
        held.discard(slot)
        if not held:
            del self._doc_chunks[chunk.doc_id]
            self._stale.discard(chunk.doc_id)
        self._chunks[slot] = None
        self._alive[slot] = False
        self._free.append(slot)
        if self._ann is not None and self._ann_pending.pop(slot, False) is False:
            self._ann.remove(slot)

    def _unindex_doc(self, doc_id: str) -> None:
        """Take a document's BM25 entry out; the next search indexes what is left of it."""
        self._stale.add(doc_id)
        entry = self._doc_terms.pop(doc_id, None)
        if entry is None:
            return
        slot, counts = entry
        for term in counts:
            postings = self._postings[term]
            del postings[slot]
            if not postings:
                del self._postings[term]
        self._total_terms -= int(self._lengths[slot])
        self._lengths[slot] = 0

    def _index_stale(self) -> None:
        """BM25 entries for the documents that changed: the terms of the title and of the text
        the document's chunks cover, at the slot of its first chunk."""
        for doc_id in sorted(self._stale):
            slots = self._doc_chunks.get(doc_id)
            if not slots:
                continue
            chunks = sorted((c.start, c.chunk_id, s, c) for s in slots if (c := self._chunks[s]) is not None)
            *_, slot, first = chunks[0]
            counts = Counter(self.analyzer.document_terms(first.title, covered_text([c[3] for c in chunks])))
            self._doc_terms[doc_id] = (slot, counts)
            length = sum(counts.values())
            self._lengths[slot] = length
            self._total_terms += length
            for term, tf in counts.items():
                self._postings.setdefault(term, {})[slot] = tf
        self._stale.clear()

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
        """The top ``k`` allowed documents by BM25 score for ``query_terms``, each as the slot of
        its first chunk (documents scoring 0 left out)."""
        self._index_stale()
        n, count = len(self._chunks), len(self._doc_terms)
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

    def search(
        self, vector: np.ndarray, query_terms: Iterable[str], k: int, allowed: np.ndarray | None, with_text: int
    ) -> tuple[tuple[Hit, ...], tuple[Hit, ...]]:
        """The top ``k`` hits by vector and by BM25, the first ``with_text`` of each with their text."""
        return tuple(  # type: ignore[return-value]
            tuple(self.hit(slot, score, n < with_text) for n, (slot, score) in enumerate(ranked))
            for ranked in (self.dense(vector, k, allowed), self.bm25(query_terms, k, allowed))
        )

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


FUSION_METHODS = ("rrf", "dbsf")


@dataclass(frozen=True)
class Fusion:
    """How the two rankings of a query become one.

    - ``rrf``, weighted reciprocal rank fusion: a document scores ``weight / (rrf_k + rank)``
      in each ranking it is in (ranks from 1).
    - ``dbsf``, distribution-based score fusion as Qdrant defines it: each ranking's
      scores are mapped to ``(score - (mean - 3 std)) / (6 std)`` (the mean and sample
      standard deviation of that ranking's scores for this query; a ranking of one
      document, or of equal scores, gives 0.5), then weighted and summed; a document
      a ranking does not hold gets nothing from it.

    The defaults are the best that ``python -m scripts.tune_rag fusion`` found on SciFact's
    train split."""

    dense_weight: float = 0.9
    bm25_weight: float = 1.0
    rrf_k: int = 2  # RRF's best on train (with dense_weight 0.75: train 0.7272, DBSF's 0.7341)
    method: str = "dbsf"

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(f"fusion method is one of {FUSION_METHODS}, got {self.method!r}")

    def describe(self) -> str:
        """The fusion in a few characters, for the index version."""
        weights = f"{self.dense_weight:g}:{self.bm25_weight:g}"
        return f"{weights}:rrf{self.rrf_k}" if self.method == "rrf" else f"{weights}:dbsf"


def dbsf_normalise(scores: Sequence[float]) -> list[float]:
    """Scores mapped so that the mean minus three sample standard deviations is 0 and the
    mean plus three is 1 (not clipped); one score, or equal ones, are 0.5 (Qdrant's ``distr_norm``)."""
    if len(scores) < 2:
        return [0.5] * len(scores)
    values = np.asarray(scores, dtype=np.float64)
    mean, std = float(values.mean()), float(values.std(ddof=1))
    if std == 0.0:
        return [0.5] * len(scores)
    return ((values - (mean - 3 * std)) / (6 * std)).tolist()


def _contributions(ranking: Sequence[Hit], weight: float, fusion: Fusion) -> list[float]:
    if fusion.method == "dbsf":
        return [weight * s for s in dbsf_normalise([hit.score for hit in ranking])]
    return [weight / (fusion.rrf_k + rank) for rank in range(1, len(ranking) + 1)]


def fuse(dense: Sequence[Hit], bm25: Sequence[Hit], fusion: Fusion) -> list[tuple[Hit, float]]:
    """Document rankings (one hit per document) fused, best first, with each
    document's fused score and the chunk that ranked it highest."""
    scores: dict[str, float] = {}
    # Each document's chunk: the one that brought it the most, one with its text first.
    best: dict[str, tuple[bool, float, Hit]] = {}
    for ranking, weight in ((dense, fusion.dense_weight), (bm25, fusion.bm25_weight)):
        for hit, contribution in zip(ranking, _contributions(ranking, weight, fusion), strict=True):
            scores[hit.doc_id] = scores.get(hit.doc_id, 0.0) + contribution
            candidate = (hit.text is not None, contribution, hit)
            if hit.doc_id not in best or candidate[:2] > best[hit.doc_id][:2]:
                best[hit.doc_id] = candidate
    ranked = sorted(scores, key=lambda doc: -scores[doc])
    return [(best[doc][2], scores[doc]) for doc in ranked]


def rank(
    dense: Iterable[Hit], bm25: Iterable[Hit], retriever: str, fusion: Fusion, candidates: int, k: int
) -> list[tuple[Hit, float]]:
    """The top ``k`` documents of a query from its shards' hits: each retriever's best
    ``candidates`` documents, fused (``retriever`` ``"hybrid"``) or one retriever's alone."""
    dense_docs = best_per_doc(dense)[:candidates]
    bm25_docs = best_per_doc(bm25)[:candidates]
    if retriever == "hybrid":
        return fuse(dense_docs, bm25_docs, fusion)[:k]
    return [(hit, hit.score) for hit in (dense_docs if retriever == "dense" else bm25_docs)[:k]]
