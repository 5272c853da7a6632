"""The retrieval regression gate: SciFact-mini (30 test queries, their judged documents and
BM25's hard negatives: 239 documents, in tests/data) through the dataflow's own chunking,
embedding, index and fusion code, in process. A change that makes retrieval worse fails here;
``python -m bench.rag`` measures the whole corpus through Kafka."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.quality import retrieval_metrics
from models.registry import get_spec
from operators.rag import Deletion, Document, Indexed, embed_documents
from operators.retrieval import Fusion, ShardIndex, best_per_doc, fuse
from operators.text import Chunker, terms
from scripts.beir import load

MINI = Path(__file__).parent / "data" / "scifact-mini"
# nDCG@10 measured when the gate was set (chunks of 256 tokens, 32 overlap, fusion defaults): BM25
# 0.7748, MiniLM 0.7563, hybrid 0.7809; the floors leave a margin for floating-point sums taken in
# another order on other CPUs.
FLOORS = {"bm25": 0.76, "dense": 0.74, "hybrid": 0.77}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, list[str]]]:
    data = load(MINI)
    minilm = get_spec("minilm-embeddings").load()

    def embed(texts: list[str]) -> np.ndarray:
        return minilm.forward(texts)["embedding"]

    chunker = Chunker(minilm.model.tokenizer, 256, 32)  # type: ignore[attr-defined]
    docs: list[tuple[str, Document | Deletion]] = [
        (doc_id, Document(doc_id, d["title"], d["text"], {}, 0)) for doc_id, d in data.corpus.items()
    ]
    index = ShardIndex(384)
    for _, (_, _, update) in embed_documents(docs, chunker, embed, 64, shards=1):
        assert isinstance(update, Indexed)
        for chunk in update.chunks:
            index.add(chunk)
    queries, _ = data.split("test")
    vectors = embed(list(queries.values()))
    out: dict[str, dict[str, list[str]]] = {"bm25": {}, "dense": {}, "hybrid": {}}
    for (qid, text), vector in zip(queries.items(), vectors, strict=True):
        allowed = index.allowed({})
        dense = best_per_doc(index.hit(s, score, False) for s, score in index.dense(vector, 100, allowed))
        bm25 = best_per_doc(index.hit(s, score, False) for s, score in index.bm25(terms(text), 100, allowed))
        out["dense"][qid] = [h.doc_id for h in dense]
        out["bm25"][qid] = [h.doc_id for h in bm25]
        out["hybrid"][qid] = [h.doc_id for h, _ in fuse(dense, bm25, Fusion())]
    return out


@pytest.mark.parametrize("retriever", sorted(FLOORS))
def test_retrieval_quality_does_not_regress(runs: dict[str, dict[str, list[str]]], retriever: str) -> None:
    qrels = load(MINI).split("test")[1]
    figures = retrieval_metrics(runs[retriever], qrels)
    assert figures["ndcg@10"] >= FLOORS[retriever], figures


def test_hybrid_beats_each_retriever_alone(runs: dict[str, dict[str, list[str]]]) -> None:
    qrels = load(MINI).split("test")[1]
    ndcg = {name: retrieval_metrics(run, qrels)["ndcg@10"] for name, run in runs.items()}
    assert ndcg["hybrid"] > max(ndcg["bm25"], ndcg["dense"]), ndcg
