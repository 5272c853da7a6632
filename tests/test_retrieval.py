"""Retrieval without a broker: the live index against rebuilt and reference ones, chunking, fusion."""

from __future__ import annotations

import random

import bm25s
import numpy as np
import pytest
import Stemmer

from dataflows.rag.retrieval import (
    Fusion,
    Hit,
    IndexedChunk,
    ShardIndex,
    best_per_doc,
    covered_text,
    dbsf_normalise,
    fuse,
    rank,
)
from dataflows.rag.text import Analyzer, Chunker, sentences, terms

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
    return IndexedChunk(f"d{i}#0", f"d{i}", "", text, 0, len(text), metadata or {}, vector)


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
    lucene = Analyzer(stopwords="lucene", stemmer="english", min_chars=2, title_weight=1)  # bm25s's defaults
    index = ShardIndex(8, k1=1.5, b=0.75, analyzer=lucene)
    for i, text in enumerate(CORPUS):
        index.add(_chunk(i, text, rng))
    stemmer = Stemmer.Stemmer("english")
    reference = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    reference.index(bm25s.tokenize(CORPUS, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    for query in ["heart disease risk", "bone fractures", "memory and sleep", "cholesterol statins heart"]:
        expected = reference.get_scores(bm25s.tokenize(query, stopwords="en", stemmer=stemmer, return_ids=False)[0])
        got = dict(index.bm25(lucene.terms(query), len(CORPUS), index.allowed({})))
        for slot, score in enumerate(expected):
            assert got.get(slot, 0.0) == pytest.approx(score, rel=1e-5), (query, CORPUS[slot])


def _piece(doc: str, n: int, text: str, start: int, end: int) -> IndexedChunk:
    return IndexedChunk(f"{doc}#{n}", doc, "Heart", text[start:end], start, end, {}, np.ones(8, np.float32) / 8**0.5)


def test_bm25_scores_a_document_once_over_the_text_its_chunks_cover() -> None:
    text = CORPUS[0] + " " + CORPUS[2]  # aspirin ... heart attacks ... Regular exercise ... blood pressure
    overlap_from, cut = text.index("adults"), text.index("Regular")  # the chunks share "adults over fifty."
    split = _index([_piece("d", 1, text, overlap_from, len(text)), _piece("d", 0, text, 0, cut)])
    whole = _index([_piece("d", 0, text, 0, len(text))])
    for index in (split, whole):
        for other in (1, 3, 4):
            index.add(_piece(f"o{other}", 0, CORPUS[other], 0, len(CORPUS[other])))
    for query in ["heart attacks adults", "exercise blood pressure aspirin", "fifty adults"]:
        assert _ranked(split, split.bm25(terms(query), 10, split.allowed({}))) == _ranked(
            whole, whole.bm25(terms(query), 10, whole.allowed({}))
        ), query
    # A document's hit is its first chunk; without its second chunk it no longer holds "exercise".
    assert _ranked(split, split.bm25(terms("exercise"), 10, split.allowed({})))[0][0] == "d#0"
    split.remove("d#1")
    assert "d#0" not in dict(_ranked(split, split.bm25(terms("exercise"), 10, split.allowed({}))))
    assert "d#0" in dict(_ranked(split, split.bm25(terms("aspirin"), 10, split.allowed({}))))
    assert covered_text([_piece("d", 0, "ab cd ef", 0, 5), _piece("d", 1, "ab cd ef", 3, 8)]) == "ab cd ef"
    assert covered_text([_piece("d", 0, "ab cd ef", 0, 2), _piece("d", 1, "ab cd ef", 6, 8)]) == "ab ef"


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
            index.add(IndexedChunk(f"d{i}#0", f"d{i}", "", "", 0, 0, {}, vector))

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

    fused = fuse(hits("a", "b", "c"), hits("c", "a"), Fusion(dense_weight=1.0, bm25_weight=2.0, rrf_k=0, method="rrf"))
    scores = {hit.doc_id: score for hit, score in fused}
    assert scores == pytest.approx({"a": 1 / 1 + 2 / 2, "b": 1 / 2, "c": 1 / 3 + 2 / 1})
    assert [hit.doc_id for hit, _ in fused] == ["c", "a", "b"]
    chunks = [Hit("a#1", "a", 0.2, 0, 1), Hit("a#0", "a", 0.9, 0, 1), Hit("b#0", "b", 0.5, 0, 1)]
    assert [h.chunk_id for h in best_per_doc(chunks)] == ["a#0", "b#0"]


def _scored(*pairs: tuple[str, float]) -> list[Hit]:
    return [Hit(f"{d}#0", d, score, 0, 1) for d, score in pairs]


def test_dbsf_maps_mean_minus_and_plus_three_sample_deviations_to_0_and_1() -> None:
    scores = [10.0, 7.0, 4.0, 3.0]
    mean, std = float(np.mean(scores)), float(np.std(scores, ddof=1))
    assert dbsf_normalise(scores) == pytest.approx([(s - mean + 3 * std) / (6 * std) for s in scores])
    normalised = dbsf_normalise([5.0, 1.0, 0.5, 0.2, 0.1])  # whatever the scores: mean 0.5, deviation 1/6
    assert (np.mean(normalised), np.std(normalised, ddof=1)) == pytest.approx((0.5, 1 / 6))
    assert dbsf_normalise([0.7]) == [0.5]
    assert dbsf_normalise([2.0, 2.0, 2.0]) == [0.5, 0.5, 0.5]
    assert dbsf_normalise([]) == []


def test_dbsf_fusion_sums_weighted_normalised_scores_and_ignores_each_rankings_scale() -> None:
    dense = _scored(("a", 0.9), ("b", 0.5), ("c", 0.45), ("d", 0.4))
    bm25 = _scored(("c", 30.0), ("d", 29.0), ("e", 5.0))
    fusion = Fusion(dense_weight=2.0, bm25_weight=1.0, method="dbsf")
    scores = {hit.doc_id: score for hit, score in fuse(dense, bm25, fusion)}
    nd = dict(zip("abcd", dbsf_normalise([0.9, 0.5, 0.45, 0.4]), strict=True))
    nb = dict(zip("cde", dbsf_normalise([30.0, 29.0, 5.0]), strict=True))
    assert scores == pytest.approx({"a": 2 * nd["a"], "b": 2 * nd["b"], "c": 2 * nd["c"] + nb["c"],
                                    "d": 2 * nd["d"] + nb["d"], "e": nb["e"]})  # fmt: skip
    # Scores, not ranks: BM25 in other units (x100, +7) fuses the same.
    rescaled = _scored(*((h.doc_id, h.score * 100 + 7) for h in bm25))
    same, original = fuse(dense, rescaled, fusion), fuse(dense, bm25, fusion)
    assert [h.doc_id for h, _ in same] == [h.doc_id for h, _ in original]
    assert [s for _, s in same] == pytest.approx([s for _, s in original])
    # A dense top document far ahead of the rest stays on top under DBSF, where rank fusion
    # puts a document both rankings hold, low in each, above it.
    dense = _scored(("a", 0.9), *((d, 0.1) for d in "bcdghijk"))
    bm25 = _scored(("e", 30.0), ("f", 29.0), ("c", 5.0))
    assert next(h.doc_id for h, _ in fuse(dense, bm25, Fusion(1.0, 1.0, method="dbsf"))) == "a"
    assert next(h.doc_id for h, _ in fuse(dense, bm25, Fusion(1.0, 1.0, rrf_k=5, method="rrf"))) == "c"


def test_an_unknown_fusion_method_is_refused() -> None:
    with pytest.raises(ValueError, match="fusion method"):
        Fusion(method="linear")
    assert Fusion(method="dbsf").describe() != Fusion(method="rrf").describe()


def test_rank_fuses_the_shards_best_chunk_per_document_or_ranks_one_retriever() -> None:
    dense = [*_scored(("a", 0.9), ("b", 0.8)), Hit("a#1", "a", 0.95, 0, 1)]
    bm25 = _scored(("b", 3.0), ("c", 1.0))
    assert [(h.chunk_id, s) for h, s in rank(dense, bm25, "dense", Fusion(), 100, 10)] == [("a#1", 0.95), ("b#0", 0.8)]
    assert [h.doc_id for h, _ in rank(dense, bm25, "bm25", Fusion(), 1, 10)] == ["b"]
    assert [h.doc_id for h, _ in rank(dense, bm25, "hybrid", Fusion(1.0, 1.0, 5, "rrf"), 100, 2)] == ["b", "a"]


def test_analyzer_drops_its_stop_words_stems_and_counts_the_title() -> None:
    text = "The patients were not treated with 2 doses of statins; IL-6 levels fell."
    assert terms(text) == Analyzer().terms(text)
    lucene, nltk = Analyzer("lucene").terms(text), Analyzer("nltk").terms(text)
    assert "were" in lucene and "were" not in nltk and "the" not in lucene  # NLTK's list is longer
    assert "not" not in lucene and "not" not in nltk
    assert Analyzer(stemmer="").terms("statins treated") == ["statins", "treated"]
    assert Analyzer(stemmer="english").terms("statins treated") == ["statin", "treat"]
    # Single characters count only from min_chars=1: "IL-6" is "il" and "6", "2 doses" keeps its number.
    assert "6" in Analyzer(min_chars=1).terms(text) and "2" in Analyzer(min_chars=1).terms(text)
    assert "6" not in Analyzer(min_chars=2).terms(text)
    title = "Statin therapy"
    assert Analyzer("lucene", title_weight=2).document_terms(title, "in adults") == ["statin", "therapi"] * 2 + [
        "adult"
    ]
    assert Analyzer("lucene", title_weight=0).document_terms(title, "in adults") == ["adult"]
    assert Analyzer("none", title_weight=1).document_terms(title, "in adults") == ["statin", "therapi", "in", "adult"]
    # Once title, once text: the terms of "title\ntext", in the same order.
    assert Analyzer(title_weight=1).document_terms(title, text) == terms(f"{title}\n{text}")
    for bad in ({"stopwords": "klingon"}, {"stemmer": "klingon"}, {"min_chars": 0}, {"title_weight": -1}):
        with pytest.raises(ValueError):
            Analyzer(**bad)


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
