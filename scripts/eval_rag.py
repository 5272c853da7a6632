"""The RAG eval suite: a labelled query set (BEIR format) asked of a running RAG dataflow.

Retrieval: hit rate@1/@10, MRR@10, nDCG@10, recall@10/@100 over the judged
queries (:func:`models.quality.retrieval_metrics`), for the hybrid ranking and
for each retriever alone. Generation: faithfulness (the share of answer
sentences found, word for word, in the document text their citation points at)
and answer relevance (cosine similarity of the answer's and the question's
MiniLM embeddings), the share of questions answered, latency. Fusion is tuned
on the train split (:func:`tune`) and reported on test.

    python -m scripts.eval_rag --split test     # against the dataflow serving rag.queries

The run is recorded on ``rag.evals`` under the index version the dataflow
serves (embedding model, chunking, fusion); the dataflow exports the latest
run's figures for its version (``patternflow_rag_eval``), and ``patternflow
audit`` reports a RAG dataflow serving a version no run was recorded for.

Without SciFact's documents in the index the figures mean nothing: ``python -m
bench.rag`` loads them into a fresh dataflow and runs this suite.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from clients.inference import InferenceClient
from dataflows.rag.retrieval import Fusion, Hit, fuse
from dataflows.rag.steps import EvalRun
from models.quality import retrieval_metrics
from operators.kafka import produce
from operators.protocol import RAG_ANSWERS_TOPIC, RAG_EVALS_TOPIC, RAG_QUERIES_TOPIC
from patternflow import default_brokers, wall_ms
from scripts.beir import SCIFACT, Beir, load

__all__ = ["Asked", "ask", "generation_metrics", "tune"]


@dataclass
class Asked:
    """What a query set got back: per query, the ranked document ids, the replies, the round trips."""

    runs: dict[str, list[str]] = field(default_factory=dict)
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency_ms: list[float] = field(default_factory=list)

    def metrics(self, qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
        return retrieval_metrics(self.runs, qrels)


def _bar(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done == total else ""
    print(f"\r  {what}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, flush=True)


def ask(
    client: InferenceClient,
    queries: Mapping[str, str],
    *,
    retriever: str = "hybrid",
    k: int = 100,
    answer: bool = False,
    what: str = "queries",
) -> Asked:
    """Each query in turn (one in flight: the latencies are the dataflow's, not a queue's), with a progress bar."""
    asked = Asked()
    for n, (qid, text) in enumerate(queries.items(), 1):
        start = time.perf_counter()
        reply = client.predict("rag", {"query": text, "k": k, "answer": answer, "retriever": retriever})
        asked.latency_ms.append((time.perf_counter() - start) * 1000)
        if reply.get("status") != "ok":
            raise RuntimeError(f"query {qid} was answered {reply.get('status')}: {reply.get('error')}")
        asked.runs[qid] = [hit["doc_id"] for hit in reply["outputs"]["hits"]]
        asked.replies[qid] = reply
        if n % 10 == 0 or n == len(queries):
            _bar(n, len(queries), what)
    return asked


_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def generation_metrics(asked: Asked, corpus: Mapping[str, Mapping[str, str]], embed: Any) -> dict[str, float]:
    """Faithfulness, answer relevance and the answered share of replies that carry answers."""
    sentences = supported = 0
    relevance: list[float] = []
    questions, answers = [], []
    for reply in asked.replies.values():
        answer = reply["outputs"]["answer"]
        if not answer["found"]:
            continue
        for sentence in answer["sentences"]:
            sentences += 1
            cited = (corpus.get(c["doc_id"], {}).get("text", "")[c["start"] : c["end"]] for c in sentence["citations"])
            supported += any(_norm(sentence["text"]) in _norm(text) for text in cited)
        questions.append(reply["outputs"]["query"])
        answers.append(answer["text"])
    if questions:
        q, a = embed(questions), embed(answers)
        relevance = list(np.sum(q * a, axis=1))
    found = sum(r["outputs"]["answer"]["found"] for r in asked.replies.values())
    return {
        "faithfulness": supported / sentences if sentences else 0.0,
        "answer_relevance": float(np.mean(relevance)) if relevance else 0.0,
        "answered": found / len(asked.replies) if asked.replies else 0.0,
    }


def _hits(asked: Asked, qid: str) -> list[Hit]:
    """A query's ranking as the reply gave it: document ids and the retriever's scores (DBSF fuses scores)."""
    return [Hit(h["doc_id"], h["doc_id"], h["score"], 0, 0) for h in asked.replies[qid]["outputs"]["hits"]]


def fused_runs(dense: Asked, bm25: Asked, fusion: Fusion, k: int = 100) -> dict[str, list[str]]:
    """The hybrid ranking the dataflow would give with ``fusion``, from the two retrievers' rankings."""
    return {qid: [hit.doc_id for hit, _ in fuse(_hits(dense, qid), _hits(bm25, qid), fusion)[:k]] for qid in dense.runs}


def tune(dense: Asked, bm25: Asked, qrels: Mapping[str, Mapping[str, int]]) -> list[tuple[Fusion, dict[str, float]]]:
    """Every fusion of a grid (weighted RRF and DBSF), with its figures, best nDCG@10 first."""
    grid = [Fusion(w, 1.0, k, "rrf") for w in (0.5, 0.75, 1.0, 1.5, 2.0) for k in (2, 5, 10, 60)]
    grid += [Fusion(w, 1.0, method="dbsf") for w in (0.5, 0.7, 0.9, 1.0, 1.2, 1.5)]
    scored = [(f, retrieval_metrics(fused_runs(dense, bm25, f), qrels)) for f in grid]
    return sorted(scored, key=lambda fs: -fs[1]["ndcg@10"])


def record(brokers: str, asked: Asked, split: str, figures: dict[str, float], topic: str = RAG_EVALS_TOPIC) -> EvalRun:
    """Record the run on the evals topic, under the index version the replies name: the RAG
    dataflow serving that version exports its figures, and ``patternflow audit`` finds them."""
    (version,) = {reply.get("version", "") for reply in asked.replies.values()} or {""}
    if not version:
        raise RuntimeError("the RAG dataflow's replies name no index version: is it older than this script?")
    run = EvalRun(version, split, len(asked.runs), {k: round(v, 6) for k, v in figures.items()}, wall_ms())
    produce(brokers, [run.to_message(topic)])
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SCIFACT, help="a labelled query set in BEIR's format (SciFact)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="ask only the first N queries")
    parser.add_argument("--queries-topic", default=RAG_QUERIES_TOPIC)
    parser.add_argument("--answers-topic", default=RAG_ANSWERS_TOPIC)
    parser.add_argument("--evals-topic", default=RAG_EVALS_TOPIC, help="where the run is recorded")
    args = parser.parse_args()
    data: Beir = load(args.data)
    queries, qrels = data.split(args.split)
    if args.limit:
        queries = dict(list(queries.items())[: args.limit])
    brokers = default_brokers()
    topics = {"request_topic": args.queries_topic, "reply_topic": args.answers_topic}
    with InferenceClient(brokers, **topics, timeout_s=30) as c:
        asked = ask(c, queries)
    figures = asked.metrics({qid: qrels[qid] for qid in queries})
    run = record(brokers, asked, args.split, figures, args.evals_topic)
    print(orjson.dumps({name: round(value, 4) for name, value in figures.items()}).decode())
    print(f"recorded on {args.evals_topic} for index {run.index_version}", file=sys.stderr)


if __name__ == "__main__":
    main()
