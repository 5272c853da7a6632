"""Retrieval without a broker: the live index against rebuilt and reference ones, chunking, fusion."""

from __future__ import annotations

import random

import bm25s
import numpy as np
import pytest
import Stemmer

from dataflows.rag.retrieval import Fusion, Hit, IndexedChunk, ShardIndex, best_per_doc, fuse
from dataflows.rag.text import Chunker, sentences, terms

CORPUS = [
    "Aspirin reduces the risk of heart attacks in adults over fifty.",
    "Vitamin D deficiency is associated with bone fractures and falls.",
    "Regular exercise lowers blood pressure and the risk of heart disease.",
    "Heart attacks are more common in winter months.",
    "Statins lower cholesterol; cholesterol is a risk factor for heart disease.",
    "Sleep deprivation impairs memory consolidation in adolescents.",
    "Coffee consumption is not associated with heart disease risk.",
    "Bone density declines with age, faster in women after menopause.",
]


def _chunk(i: int, text: str, rng: np.random.Generator, metadata: dict | None = None) -> IndexedChunk:
    vector = rng.normal(size=8).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return IndexedChunk(f"d{i}#0", f"d{i}", "", text, 0, len(text), metadata or {}, vector, terms(text))


def _index(chunks: list[IndexedChunk]) -> ShardIndex:
    index = ShardIndex(8)
    for chunk in chunks:
        index.add(chunk)
    return index


def _ranked(index: ShardIndex, found: list[tuple[int, float]]) -> list[tuple[str, float]]:
    return [(index.hit(slot, score, False).chunk_id, round(score, 5)) for slot, score in found]


def test_bm25_scores_equal_bm25s() -> None:
    """The reference: bm25s (Lucene's BM25, its English stop words, the Snowball stemmer)."""
    rng = np.random.default_rng(0)
    index = _index([_chunk(i, text, rng) for i, text in enumerate(CORPUS)])
    stemmer = Stemmer.Stemmer("english")
    reference = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    reference.index(bm25s.tokenize(CORPUS, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    for query in ["heart disease risk", "bone fractures", "memory and sleep", "cholesterol statins heart"]:
        expected = reference.get_scores(bm25s.tokenize(query, stopwords="en", stemmer=stemmer, return_ids=False)[0])
        got = dict(index.bm25(terms(query), len(CORPUS), index.allowed({})))
        for slot, score in enumerate(expected):
            assert got.get(slot, 0.0) == pytest.approx(score, rel=1e-5), (query, CORPUS[slot])


def test_live_index_equals_a_rebuilt_one() -> None:
    """Adds, replacements and removals in any order leave the index a fresh build of what remains would be."""
    rng = np.random.default_rng(1)
    pyrng = random.Random(1)
    live = ShardIndex(8)
    current: dict[str, IndexedChunk] = {}
    for step in range(400):
        i = pyrng.randrange(30)
        if pyrng.random() < 0.3:
            live.remove(f"d{i}#0")
            current.pop(f"d{i}#0", None)
        else:
            words = pyrng.sample(" ".join(CORPUS).split(), pyrng.randint(3, 12))
            chunk = _chunk(i, " ".join(words) + f" step{step}", rng)
            live.add(chunk)
            current[chunk.chunk_id] = chunk
    rebuilt = _index(list(current.values()))
    assert len(live) == len(rebuilt) == len(current)
    for query in ["heart risk", "bone density women", "coffee", "step399 memory"]:
        assert _ranked(live, live.bm25(terms(query), 10, live.allowed({}))) == _ranked(
            rebuilt, rebuilt.bm25(terms(query), 10, rebuilt.allowed({}))
        )
        vector = rng.normal(size=8).astype(np.float32)
        assert _ranked(live, live.dense(vector, 10, live.allowed({}))) == _ranked(
            rebuilt, rebuilt.dense(vector, 10, rebuilt.allowed({}))
        )


def test_dense_is_exact_and_filters_apply() -> None:
    rng = np.random.default_rng(2)
    chunks = [_chunk(i, text, rng, {"year": 2000 + i % 3, "tags": "x"}) for i, text in enumerate(CORPUS)]
    index = _index(chunks)
    query = rng.normal(size=8).astype(np.float32)
    brute = sorted(((float(c.vector @ query), c.chunk_id) for c in chunks), reverse=True)
    assert [cid for cid, _ in _ranked(index, index.dense(query, 3, index.allowed({})))] == [c for _, c in brute[:3]]
    only = index.allowed({"year": [2001, 2002]})
    found = [index.hit(slot, s, False).doc_id for slot, s in index.dense(query, 10, only)]
    assert sorted(found) == sorted(f"d{i}" for i in range(len(CORPUS)) if i % 3 in (1, 2))
    assert index.bm25(terms("heart"), 10, index.allowed({"year": 1999})) == []


def _clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    """Unit vectors around ``centers``: neighbours are close calls, as with real embeddings."""
    x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_dense_search_finds_what_exact_search_finds_through_upserts_and_deletes() -> None:
    rng, dim = np.random.default_rng(3), 32
    centers = rng.normal(size=(40, dim)) / np.sqrt(dim)
    approx, exact = ShardIndex(dim, ann_min=1), ShardIndex(dim, ann_min=0)

    def put(i: int, vector: np.ndarray) -> None:
        for index in (approx, exact):
            index.add(IndexedChunk(f"d{i}#0", f"d{i}", "", "", 0, 0, {}, vector, ()))

    def top(index: ShardIndex, query: np.ndarray, k: int = 10) -> list[str]:
        return [index.hit(slot, score, False).chunk_id for slot, score in index.dense(query, k, None)]

    for i, vector in enumerate(_clustered(rng, 3_000, dim, centers)):
        put(i, vector)
    queries = _clustered(rng, 50, dim, centers)
    top(approx, queries[0])  # the graph is built here, and follows every change from now on
    assert approx.ann_bytes > 0 and exact.ann_bytes == 0
    moved = _clustered(rng, 300, dim, centers)
    for i in range(300):  # upserts to new vectors, then deletes
        put(i, moved[i])
    for index in (approx, exact):
        for i in range(300, 600):
            index.remove(f"d{i}#0")
    recall = [len(set(top(approx, q)) & set(top(exact, q))) / 10 for q in queries]
    assert sum(recall) / len(recall) >= 0.98
    found = {cid for q in queries for cid in top(approx, q, 100)}
    assert not found & {f"d{i}#0" for i in range(300, 600)}, "a deleted chunk came back"
    for i in (0, 150, 299):
        (best, score), *_ = approx.dense(moved[i], 1, None)
        assert approx.hit(best, score, False).chunk_id == f"d{i}#0" and score == pytest.approx(1.0, abs=1e-5)
    # Scores are the exact ones: a chunk both find scores the same in both.
    for q in queries[:10]:
        scored = {approx.hit(s, v, False).chunk_id: v for s, v in approx.dense(q, 10, None)}
        reference = {exact.hit(s, v, False).chunk_id: v for s, v in exact.dense(q, 10, None)}
        assert {c: scored[c] for c in scored.keys() & reference.keys()} == pytest.approx(
            {c: reference[c] for c in scored.keys() & reference.keys()}
        )


def test_fusion_ranks_documents_by_weighted_reciprocal_rank() -> None:
    def hits(*docs: str) -> list[Hit]:
        return [Hit(f"{d}#0", d, 1.0 / (n + 1), 0, 1, text="t" if d != "c" else None) for n, d in enumerate(docs)]

    fused = fuse(hits("a", "b", "c"), hits("c", "a"), Fusion(dense_weight=1.0, bm25_weight=2.0, rrf_k=0))
    scores = {hit.doc_id: score for hit, score in fused}
    assert scores == pytest.approx({"a": 1 / 1 + 2 / 2, "b": 1 / 2, "c": 1 / 3 + 2 / 1})
    assert [hit.doc_id for hit, _ in fused] == ["c", "a", "b"]
    chunks = [Hit("a#1", "a", 0.2, 0, 1), Hit("a#0", "a", 0.9, 0, 1), Hit("b#0", "b", 0.5, 0, 1)]
    assert [h.chunk_id for h in best_per_doc(chunks)] == ["a#0", "b#0"]


class _WhitespaceTokenizer:
    """A stand-in with the fast tokenizers' offsets interface: one token per word."""

    def __call__(self, text: str, **_: object) -> dict[str, list[tuple[int, int]]]:
        import re

        return {"offset_mapping": [m.span() for m in re.finditer(r"\S+", text)]}


def test_chunks_cover_the_text_with_overlap_and_exact_offsets() -> None:
    text = " ".join(f"w{i}" for i in range(23))
    chunks = Chunker(_WhitespaceTokenizer(), chunk_tokens=10, overlap_tokens=3).chunks(text)
    assert [c.text.split()[0] for c in chunks] == ["w0", "w7", "w14"]
    assert chunks[-1].text.split()[-1] == "w22"
    assert all(text[c.start : c.end] == c.text for c in chunks)
    assert len(chunks[0].text.split()) == 10 and chunks[1].text.split()[:3] == chunks[0].text.split()[-3:]
    assert Chunker(_WhitespaceTokenizer(), 10, 3).chunks("   ") == []
    with pytest.raises(ValueError, match="overlap_tokens"):
        Chunker(_WhitespaceTokenizer(), 10, 10)


def test_sentences_are_spans_of_the_text() -> None:
    text = "  First claim holds. Second one (n=12) too!  3 patients died? [Ref] ends e.g. here.  "
    spans = sentences(text)
    assert [text[a:b] for a, b in spans] == [
        "First claim holds.",
        "Second one (n=12) too!",
        "3 patients died?",
        "[Ref] ends e.g. here.",
    ]
