"""RAG over streams on SciFact: retrieval quality, embedding speed against raw encode, freshness, query latency.

A fresh RAG dataflow indexes the corpus from Kafka; then the eval suite
(:mod:`scripts.eval_rag`) asks it the test queries (hybrid, and each retriever
alone), the fusion grid is scored on the train queries, a sample of questions
gets generated answers, and new documents are produced one at a time while a
prober asks for each until it is found.

The embedding stage's rate is its documents over its own seconds in the
dataflow (chunking, tokenising, encoding, BM25 terms: the ``rag.embed`` step's
metrics); the baseline is ``SentenceTransformer.encode`` of the same chunk texts
of a sample of the documents, at the same batch size and torch threads, in this
process, while the dataflow is idle.

    python -m bench.rag            # all 5,183 documents, 300 test and 809 train queries
    python -m bench.rag --quick    # 200 documents, 30 test queries, no tuning
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import orjson
import torch
from matplotlib.figure import Figure
from prometheus_client.parser import text_string_to_metric_families

from bench.report import parse_args, progress, write_report
from clients.inference import InferenceClient
from dataflows.launch import exited, run_command
from dataflows.rag import Settings
from dataflows.rag.retrieval import Fusion
from dataflows.rag.text import Chunker
from models.quality import retrieval_metrics
from models.registry import get_spec
from operators.kafka import KafkaMessage, produce
from patternflow import default_brokers, free_port
from scripts.beir import SCIFACT, load
from scripts.eval_rag import Asked, ask, fused_runs, generation_metrics, tune

BROKERS = default_brokers()
ROOT = Path(__file__).parent.parent
# The dataflow's default; the baseline encodes with as many. One thread also serves single
# queries fastest here: two threads, sharing two cores with the broker, took 4x longer per query.
THREADS = Settings().torch_threads


def doc_message(topic: str, doc_id: str, doc: dict[str, str]) -> KafkaMessage:
    return KafkaMessage(orjson.dumps({"title": doc["title"], "text": doc["text"]}), key=doc_id.encode(), topic=topic)


def step_figures(port: int, step: str) -> tuple[float, float]:
    """A step's items and busy seconds, from the dataflow's metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    items = seconds = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("step") != step:
                continue
            if sample.name == "patternflow_items_total" and sample.labels.get("outcome") == "ok":
                items = sample.value
            elif sample.name == "patternflow_step_seconds_sum":
                seconds = sample.value
    return items, seconds


def raw_encode_rate(minilm: Any, docs: dict[str, dict[str, str]], chunker: Chunker, batch_size: int) -> float:
    """Documents per second through plain ``SentenceTransformer.encode`` of their chunk texts."""
    texts = [f"{d['title']}\n{c.text}" for d in docs.values() for c in chunker.chunks(d["text"])]
    start = time.perf_counter()
    minilm.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True)
    return len(docs) / (time.perf_counter() - start)


def freshness(client: InferenceClient, s: Settings, fresh: list[tuple[str, dict[str, str]]]) -> list[float]:
    """Seconds from producing each document to the first reply that retrieves it (titles as queries)."""
    seconds = []
    for n, (doc_id, doc) in enumerate(fresh, 1):
        produced = time.perf_counter()
        produce(BROKERS, [doc_message(s.documents_topic, doc_id, doc)])
        while True:
            reply = client.predict("rag", {"query": doc["title"], "k": 10, "answer": False})
            if any(hit["doc_id"] == doc_id for hit in reply["outputs"]["hits"]):
                seconds.append(time.perf_counter() - produced)
                break
            if time.perf_counter() - produced > 60:
                raise RuntimeError(f"document {doc_id} was not retrievable 60 s after it was produced")
        progress(f"freshness {n}/{len(fresh)}: {seconds[-1]:.2f} s")
    return seconds


def plot(ndcg: dict[str, float], latency_ms: list[float], fresh_s: list[float]) -> Figure:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6))
    a.bar(list(ndcg), list(ndcg.values()), color=["#aaaaaa", "#aaaaaa", "#1f77b4"])
    a.set_ylim(0.5, 0.8)
    a.set_title("nDCG@10, SciFact test")
    for x, value in enumerate(ndcg.values()):
        a.text(x, value, f"{value:.3f}", ha="center", va="bottom")
    b.hist(latency_ms, bins=40, color="#1f77b4")
    b.axvline(float(np.percentile(latency_ms, 95)), color="k", linestyle="--", label="p95")
    b.set_title("query round trip, no generation")
    b.set_xlabel("ms")
    b.legend()
    c.plot(range(1, len(fresh_s) + 1), fresh_s, "o", color="#1f77b4")
    c.axhline(float(np.percentile(fresh_s, 95)), color="k", linestyle="--", label="p95")
    c.set_title("freshness: produced to retrieved")
    c.set_xlabel("document")
    c.set_ylabel("s")
    c.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    args = parse_args(__doc__.split("\n\n")[0])
    torch.set_num_threads(THREADS)
    data = load(SCIFACT)
    test_queries, test_qrels = data.split("test")
    train_queries, train_qrels = data.split("train")
    rng = random.Random(7)
    if args.quick:
        test_queries = dict(list(test_queries.items())[:30])
        relevant = {doc for qid in test_queries for doc in test_qrels[qid]}
        others = rng.sample(sorted(set(data.corpus) - relevant), 200 - len(relevant))
        corpus = {doc: data.corpus[doc] for doc in sorted(relevant) + others}
    else:
        corpus = dict(data.corpus)
    unused = sorted(set(data.corpus) - set(corpus))
    # Fresh documents: unseen ones (quick), or copies under new ids (full, the corpus is all in).
    fresh_ids = rng.sample(unused, 10) if args.quick else rng.sample(sorted(corpus), 40)
    fresh = [(doc if args.quick else f"fresh-{doc}", data.corpus[doc]) for doc in fresh_ids]

    prefix = f"bench.rag.{uuid.uuid4().hex[:8]}"
    s = Settings(
        documents_topic=f"{prefix}.documents", queries_topic=f"{prefix}.queries", answers_topic=f"{prefix}.answers"
    )
    minilm: Any = get_spec("minilm-embeddings").load()  # once: the baseline, the chunker, answer relevance
    chunker = Chunker(minilm.model.tokenizer, s.chunk_tokens, s.overlap_tokens)
    sample = dict(list(corpus.items())[: 50 if args.quick else 400])
    progress(f"baseline: raw encode of the chunks of {len(sample)} documents, batch size {s.embed_batch_size}")
    raw_rate = raw_encode_rate(minilm, sample, chunker, s.embed_batch_size)

    workdir = Path(tempfile.mkdtemp(prefix="bench-rag-"))
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": BROKERS,
        "RAG_DOCUMENTS_TOPIC": s.documents_topic,
        "RAG_QUERIES_TOPIC": s.queries_topic,
        "RAG_ANSWERS_TOPIC": s.answers_topic,
        "RAG_STATE_DIR": str(workdir / "state"),
        "RAG_METRICS_PORT": str(port),
        "RAG_TORCH_THREADS": str(THREADS),
    }
    proc = subprocess.Popen(run_command("dataflows.rag:build()", workdir / "recovery"), env=env, cwd=ROOT)
    try:
        with InferenceClient(
            BROKERS, request_topic=s.queries_topic, reply_topic=s.answers_topic, timeout_s=120
        ) as client:
            client.wait_until_serving("rag", {"query": "warm-up", "answer": False}, give_up=lambda: exited(proc))
            progress(f"indexing {len(corpus):,} documents")
            start = time.perf_counter()
            produce(BROKERS, [doc_message(s.documents_topic, doc_id, doc) for doc_id, doc in corpus.items()])
            while (done := step_figures(port, "rag.embed")[0]) < len(corpus):
                if exited(proc):
                    raise RuntimeError(f"the dataflow stopped: {exited(proc)}")
                progress(f"indexed {done:,.0f}/{len(corpus):,} documents")
                time.sleep(5)
            ingest_s = time.perf_counter() - start
            docs, embed_s = step_figures(port, "rag.embed")
            progress(f"indexed in {ingest_s:.0f} s; embedding stage {docs / embed_s:.1f} docs/s, raw {raw_rate:.1f}")

            test_q = {qid: test_queries[qid] for qid in test_queries}
            hybrid = ask(client, test_q, what="test, hybrid")
            dense = ask(client, test_q, retriever="dense", what="test, dense")
            bm25 = ask(client, test_q, retriever="bm25", what="test, bm25")
            qrels = {qid: test_qrels[qid] for qid in test_q}
            figures = hybrid.metrics(qrels)
            tuned_rows: list[str] = []
            if not args.quick:
                train_dense = ask(client, train_queries, retriever="dense", what="train, dense")
                train_bm25 = ask(client, train_queries, retriever="bm25", what="train, bm25")
                grid = tune(train_dense, train_bm25, train_qrels)
                tuned_rows = [
                    "Fusion grid on the train split (best first; dense:bm25 weights, then the method; "
                    f"the dataflow's default is {s.fusion_config.describe()}):",
                    "",
                    "| fusion | nDCG@10 train | nDCG@10 test |",
                    "| --- | --- | --- |",
                    *(
                        f"| {f.describe()} | {m['ndcg@10']:.4f} | {hybrid_metric(dense, bm25, f, qrels):.4f} |"
                        for f, m in grid[:8]
                    ),
                    "",
                ]
            answered = ask(
                client, dict(list(test_q.items())[: 10 if args.quick else 100]), answer=True, k=10, what="answers"
            )
            generation = generation_metrics(answered, data.corpus, lambda t: minilm.forward(t)["embedding"])
            fresh_s = freshness(client, s, fresh)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)

    ndcg = {"BM25": bm25.metrics(qrels)["ndcg@10"], "MiniLM": dense.metrics(qrels)["ndcg@10"]}
    ndcg["hybrid"] = figures["ndcg@10"]
    generate_ms = [r["timings_ms"]["generate"] for r in answered.replies.values()]
    result: dict[str, Any] = {
        "ndcg10_test": round(figures["ndcg@10"], 4),
        "mrr10_test": round(figures["mrr@10"], 4),
        "recall100_test": round(figures["recall@100"], 4),
        "bm25_ndcg10": round(ndcg["BM25"], 4),
        "dense_ndcg10": round(ndcg["MiniLM"], 4),
        "embed_docs_per_s": round(docs / embed_s, 2),
        "raw_encode_docs_per_s": round(raw_rate, 2),
        "embed_vs_raw": round(docs / embed_s / raw_rate, 3),
        "freshness_p95_s": round(float(np.percentile(fresh_s, 95)), 2),
        "query_p95_ms": round(float(np.percentile(hybrid.latency_ms, 95)), 1),
        "faithfulness": round(generation["faithfulness"], 3),
        "answer_relevance": round(generation["answer_relevance"], 3),
    }
    notes = [
        f"Corpus: {len(corpus):,} SciFact documents ({'a subset' if args.quick else 'all'}), "
        f"indexed from Kafka in {ingest_s:.0f} s end to end. Queries: {len(test_q)} test queries, one in flight, "
        f"k=100, no generation; p50 {np.percentile(hybrid.latency_ms, 50):.0f} ms. The whole hybrid test figure set: "
        + ", ".join(f"{name} {value:.4f}" for name, value in figures.items())
        + ".",
        f"Generation (extractive, {len(answered.replies)} test questions, k=10): answered "
        f"{generation['answered']:.0%}, faithfulness {generation['faithfulness']:.3f} (answer sentences found word for "
        f"word at their citations' offsets), answer relevance {generation['answer_relevance']:.3f}, generation p50 "
        f"{np.percentile(generate_ms, 50):.0f} ms.",
        f"Freshness: {len(fresh)} documents produced one at a time to the running dataflow, each probed with its "
        f"title until it was in the top 10; p50 {np.percentile(fresh_s, 50):.2f} s.",
        f"Machine: the 2-core CPU the broker shares; torch threads {THREADS} in the dataflow and the baseline.",
        "",
    ]
    write_report(
        "rag",
        "RAG on SciFact: hybrid retrieval over a live index",
        plot(ndcg, hybrid.latency_ms, fresh_s),
        notes,
        result,
        quick=args.quick,
        tables=tuple(tuned_rows),
    )


def hybrid_metric(dense: Asked, bm25: Asked, fusion: Fusion, qrels: dict[str, dict[str, int]]) -> float:
    """nDCG@10 of the hybrid ranking with ``fusion``, from the two retrievers' rankings."""
    return retrieval_metrics(fused_runs(dense, bm25, fusion), qrels)["ndcg@10"]


if __name__ == "__main__":
    main()
