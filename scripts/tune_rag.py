"""Offline retrieval tuning on SciFact: BM25 variants and fusion methods, without Kafka.

The corpus is chunked and embedded once (the dataflow's chunker and MiniLM,
title and chunk text as the dataflow embeds them) and the vectors are cached
under ``~/.cache/patternflow/rag/``; then the shards are built and searched with
the dataflow's own code (:class:`~dataflows.rag.retrieval.ShardIndex`,
:func:`~dataflows.rag.retrieval.rank`), so a figure here is the figure the
live dataflow gives for the same settings, minus float noise in the vectors.

Choices are made on the train split; test is scored once per chosen configuration.

    python -m scripts.tune_rag encode             # chunk and embed the corpus and queries (cached)
    python -m scripts.tune_rag bm25               # the BM25 grid on train, the best on test (no vectors needed)
    python -m scripts.tune_rag fusion             # each fusion method tuned on train, scored on test
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from dataflows.rag.retrieval import Fusion, Hit, IndexedChunk, ShardIndex, rank
from dataflows.rag.text import ANALYZER, Analyzer, Chunker
from models.quality import retrieval_metrics
from operators.stateful import shard_of
from scripts.beir import SCIFACT, Beir, load

__all__ = ["Candidates", "Encoded", "Offline", "encode"]

BM25S = Analyzer("lucene", "english", 2, 1)  # bm25s's defaults, where the tuning starts
CACHE = Path(os.environ.get("PATTERNFLOW_CACHE", Path.home() / ".cache" / "patternflow")) / "rag"


@dataclass(frozen=True)
class Encoded:
    """The corpus's chunks (document id, chunk) with their vectors, and the queries' vectors."""

    chunks: list[tuple[str, Any]]  # (document id, Chunk), in corpus order
    chunk_vectors: np.ndarray  # one row per chunk, float32, L2-normalised
    query_vectors: dict[str, np.ndarray]


def _key(data_dir: Path, model: str, chunker: Chunker) -> str:
    stat = [(p.name, p.stat().st_size) for p in sorted(data_dir.glob("*.jsonl*"))]
    what = orjson.dumps([model, chunker.chunk_tokens, chunker.overlap_tokens, stat])
    return hashlib.sha256(what).hexdigest()[:16]


def encode(
    data: Beir, data_dir: Path = SCIFACT, chunk_tokens: int = 256, overlap_tokens: int = 32, embed_missing: bool = True
) -> Encoded:
    """Every chunk of the corpus and every query, embedded with MiniLM (cached on disk)."""
    import torch

    from models.registry import get_spec

    torch.set_num_threads(1)
    spec = get_spec("minilm-embeddings")
    minilm: Any = spec.load()
    chunker = Chunker(minilm.model.tokenizer, chunk_tokens, overlap_tokens)
    chunks = [(doc_id, c) for doc_id, doc in data.corpus.items() for c in chunker.chunks(doc["text"])]
    path = CACHE / f"scifact-{_key(data_dir, f'{spec.name}@{spec.version}', chunker)}.npz"
    if not embed_missing and not path.exists():  # BM25 alone: no vectors needed
        return Encoded(
            chunks, np.zeros((len(chunks), 384), np.float32), {q: np.zeros(384, np.float32) for q in data.queries}
        )
    if path.exists():
        held = np.load(path)
        if len(held["chunks"]) == len(chunks):
            qids = [str(q) for q in held["qids"]]
            return Encoded(chunks, held["chunks"], dict(zip(qids, held["queries"], strict=True)))
    texts = [f"{data.corpus[d]['title']}\n{c.text}" if data.corpus[d]["title"] else c.text for d, c in chunks]
    start = time.perf_counter()

    def embed(batch: Sequence[str]) -> np.ndarray:
        with torch.inference_mode():
            return minilm.model.encode(
                list(batch), batch_size=64, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
            )

    parts = []
    for i in range(0, len(texts), 640):
        parts.append(embed(texts[i : i + 640]))
        done = min(i + 640, len(texts))
        print(f"  embedded {done}/{len(texts)} chunks, {time.perf_counter() - start:.0f} s", flush=True)
    qids = sorted(data.queries)
    query_vectors = embed([data.queries[q] for q in qids])
    CACHE.mkdir(parents=True, exist_ok=True)
    vectors = np.concatenate(parts).astype(np.float32)
    np.savez(path, chunks=vectors, queries=query_vectors.astype(np.float32), qids=np.array(qids))
    return Encoded(chunks, vectors, dict(zip(qids, query_vectors, strict=True)))


@dataclass(frozen=True)
class Candidates:
    """A query's hits from every shard, by vector and by BM25 (what the dataflow gathers)."""

    dense: tuple[Hit, ...]
    bm25: tuple[Hit, ...]


class Offline:
    """The dataflow's shards over the encoded corpus, built with the dataflow's index code."""

    def __init__(self, data: Beir, enc: Encoded, analyzer: Analyzer, shards: int = 4, candidates: int = 100) -> None:
        self.data, self.enc, self.analyzer, self.candidates = data, enc, analyzer, candidates
        dim = enc.chunk_vectors.shape[1]
        self.indexes = {str(n): ShardIndex(dim, analyzer=analyzer) for n in range(shards)}
        for (doc_id, chunk), vector in zip(enc.chunks, enc.chunk_vectors, strict=True):
            title = data.corpus[doc_id]["title"]
            indexed = IndexedChunk(
                f"{doc_id}#{chunk.index}", doc_id, title, chunk.text, chunk.start, chunk.end, {}, vector,
            )  # fmt: skip
            self.indexes[shard_of(doc_id, shards)].add(indexed)

    def set_bm25(self, k1: float, b: float) -> None:
        for index in self.indexes.values():
            index.k1, index.b = k1, b

    def candidates_of(self, qids: Sequence[str], dense: bool = True) -> dict[str, Candidates]:
        """Each query's hits from every shard (dense left out when ``dense`` is false)."""
        out = {}
        for qid in qids:
            vector, query_terms = self.enc.query_vectors[qid], self.analyzer.terms(self.data.queries[qid])
            dense_hits: list[Hit] = []
            bm25_hits: list[Hit] = []
            for index in self.indexes.values():
                allowed = index.allowed({})
                if dense:
                    dense_hits += [index.hit(s, score, False) for s, score in index.dense(vector, 100, allowed)]
                bm25_hits += [index.hit(s, score, False) for s, score in index.bm25(query_terms, 100, allowed)]
            out[qid] = Candidates(tuple(dense_hits), tuple(bm25_hits))
        return out


def runs(
    found: Mapping[str, Candidates], retriever: str, fusion: Fusion | None = None, k: int = 100
) -> dict[str, list[str]]:
    """Each query's ranked document ids, as the dataflow's :func:`~dataflows.rag.retrieval.rank` gives them."""
    how = fusion or Fusion()
    return {qid: [hit.doc_id for hit, _ in rank(c.dense, c.bm25, retriever, how, 100, k)] for qid, c in found.items()}


Qrels = Mapping[str, Mapping[str, int]]


def ndcg(found: Mapping[str, Candidates], qrels: Qrels, retriever: str, fusion: Fusion | None = None) -> float:
    return retrieval_metrics(runs(found, retriever, fusion), qrels)["ndcg@10"]


def _bm25_ndcg(off: Offline, qids: Sequence[str], qrels: Mapping[str, Mapping[str, int]]) -> float:
    return ndcg(off.candidates_of(qids, dense=False), qrels, "bm25")


def tune_bm25(data: Beir, enc: Encoded, log: Any = print) -> tuple[Analyzer, float, float]:
    """BM25's analyzer, then its ``k1`` and ``b``, each chosen by nDCG@10 on the train queries."""
    train, qrels = data.split("train")
    qids = list(train)
    best: tuple[float, Analyzer, float, float] = (-1.0, BM25S, 1.5, 0.75)

    def score(analyzer: Analyzer, k1: float, b: float, off: Offline | None = None) -> Offline:
        nonlocal best
        off = off or Offline(data, enc, analyzer)
        off.set_bm25(k1, b)
        value = _bm25_ndcg(off, qids, qrels)
        log(f"  train nDCG@10 {value:.4f}  {analyzer}  k1={k1:g} b={b:g}")
        if value > best[0]:
            best = (value, analyzer, k1, b)
        return off

    for stopwords in ("lucene", "nltk", "none"):
        for stemmer in ("english", "porter", ""):
            score(Analyzer(stopwords, stemmer, BM25S.min_chars, BM25S.title_weight), 1.5, 0.75)
    _, chosen, _, _ = best
    for min_chars in (1, 2):
        for title_weight in (0, 1, 2, 3, 4):
            if (min_chars, title_weight) != (chosen.min_chars, chosen.title_weight):
                score(Analyzer(chosen.stopwords, chosen.stemmer, min_chars, title_weight), 1.5, 0.75)
    _, chosen, _, _ = best
    off = Offline(data, enc, chosen)
    for k1 in (0.6, 0.9, 1.2, 1.5, 1.8, 2.2):
        for b in (0.3, 0.5, 0.65, 0.75, 0.85, 1.0):
            score(chosen, k1, b, off)
    return best[1], best[2], best[3]


def tune_fusion(
    found: Mapping[str, Candidates], qrels: Mapping[str, Mapping[str, int]], log: Any = print
) -> dict[str, tuple[Fusion, float]]:
    """Per fusion method, the fusion of its grid with the best nDCG@10 on ``found`` (train queries)."""
    grids = {
        "rrf": [Fusion(w, 1.0, k) for w in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0) for k in (1, 2, 5, 10, 20, 60)],
        "dbsf": [Fusion(w / 10, 1.0, method="dbsf") for w in range(3, 31)],
    }
    best: dict[str, tuple[Fusion, float]] = {}
    for method, grid in grids.items():
        for fusion in grid:
            value = ndcg(found, qrels, "hybrid", fusion)
            log(f"  train nDCG@10 {value:.4f}  {fusion}")
            if method not in best or value > best[method][1]:
                best[method] = (fusion, value)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["encode", "bm25", "fusion"])
    parser.add_argument("--k1", type=float, default=ShardIndex.k1, help="BM25's k1 for the fusion runs")
    parser.add_argument("--b", type=float, default=ShardIndex.b, help="BM25's b for the fusion runs")
    args = parser.parse_args()
    data = load(SCIFACT)
    enc = encode(data, embed_missing=args.what != "bm25")
    if args.what == "encode":
        print(f"{len(enc.chunks):,} chunks, {len(enc.query_vectors):,} queries embedded")
        return
    test, test_qrels = data.split("test")
    if args.what == "bm25":
        analyzer, k1, b = tune_bm25(data, enc)
        print(f"chosen on train: {analyzer} k1={k1:g} b={b:g}")
        for name, (a, k, bb) in {"bm25s's defaults": (BM25S, 1.5, 0.75), "chosen": (analyzer, k1, b)}.items():
            off = Offline(data, enc, a)
            off.set_bm25(k, bb)
            print(f"test nDCG@10 {name}: {_bm25_ndcg(off, list(test), test_qrels):.4f}  {a} k1={k:g} b={bb:g}")
    if args.what == "fusion":
        train, train_qrels = data.split("train")
        off = Offline(data, enc, ANALYZER)
        off.set_bm25(args.k1, args.b)
        found = {"train": off.candidates_of(list(train)), "test": off.candidates_of(list(test))}
        qrels = {"train": train_qrels, "test": test_qrels}
        for retriever in ("dense", "bm25"):
            figures = {split: ndcg(found[split], qrels[split], retriever) for split in found}
            print(f"{retriever} alone: train {figures['train']:.4f}, test {figures['test']:.4f}")
        chosen = tune_fusion(found["train"], qrels["train"])
        rows = {
            "rrf, the old default": Fusion(),
            "dbsf, unweighted (Qdrant's)": Fusion(1.0, 1.0, method="dbsf"),
            **{f"{method}, chosen on train": fusion for method, (fusion, _) in chosen.items()},
        }
        for name, fusion in rows.items():
            figures = {split: ndcg(found[split], qrels[split], "hybrid", fusion) for split in found}
            print(f"{name}: train {figures['train']:.4f}, test {figures['test']:.4f}  {fusion}")


if __name__ == "__main__":
    main()
