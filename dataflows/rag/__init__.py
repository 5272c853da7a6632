"""Retrieval-augmented generation over streams: a live hybrid index and cited answers, in one dataflow.

Documents produced to ``rag.documents`` (key: the document id; a tombstone
deletes) are searchable a moment later; queries on ``rag.queries`` are answered
on the reply topic they name, over the online-inference protocol, so
:class:`clients.inference.InferenceClient` and the HTTP gateway serve them
(``client.predict("rag", {"query": "...", "k": 5})``). Message formats: see
:mod:`dataflows.rag.steps`.

Ingest: a document whose content did not change is dropped before embedding;
a changed one is cut into chunks of ``RAG_CHUNK_TOKENS`` tokens (MiniLM's
tokenizer, ``RAG_OVERLAP_TOKENS`` shared by neighbours), embedded with MiniLM in
micro-batches (what the source read together, ``RAG_EMBED_BATCH_SIZE`` chunks per
forward pass; CUDA when present) and written to its index shard, replacing all
its old chunks. The shards (``RAG_SHARDS``) keep chunks in RocksDB-backed keyed
state, consistent with the recovery snapshots: after a kill -9 the index is
exactly the one of the last snapshot, and the replayed documents are applied once.

Query: embedded, fanned out to every shard; each returns its best chunks by
vector and its best documents by BM25; the per-document rankings are fused
(``RAG_FUSION``: distribution-based score fusion by default, or weighted
reciprocal rank fusion; tuned on SciFact's train split) and the generator
answers from the top documents: by default the extractive generator (cited
sentences, or "not found in the sources"), or an OpenAI-compatible server when
``RAG_LLM_URL`` is set. Each reply names the index version (embedding model,
chunking, BM25's k1 and b, fusion); eval runs of ``scripts.eval_rag`` recorded for that version on
``rag.evals`` are exported as ``patternflow_rag_eval``. Run::

    python -m bytewax.run "dataflows.rag:build()" -r var/recovery/rag -s 1 -b 0
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow

from dataflows.rag.answers import Extractive, Generator, OpenAIChat
from dataflows.rag.retrieval import Fusion, ShardIndex
from dataflows.rag.steps import (
    Answering,
    Catalog,
    EvalRun,
    IndexShard,
    Query,
    answer,
    embed_documents,
    gather,
    index_version,
    parse_document,
    parse_query,
)
from dataflows.rag.text import Chunker
from models.registry import get_spec
from operators import metrics
from operators.dlq import DLQ_SUFFIX, to_dlq_message, try_map
from operators.kafka import TopicSpec
from operators.kafka.sink import kafka_output
from operators.protocol import DEFAULT_REPLY_TOPICS, RAG_ANSWERS_TOPIC, RAG_EVALS_TOPIC, RAG_QUERIES_TOPIC
from operators.serving import Reply, error_and_dead_letter
from operators.settings import from_env
from operators.setup import Application, TorchSettings
from operators.stateful import StateConfig, keyed_state, sharded_state
from operators.streams import split

HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Settings(TorchSettings):
    documents_topic: str = "rag.documents"
    queries_topic: str = RAG_QUERIES_TOPIC
    answers_topic: str = RAG_ANSWERS_TOPIC  # the reply topic clients use by default
    reply_topics: tuple[str, ...] = DEFAULT_REPLY_TOPICS  # where else queries may ask to be answered
    evals_topic: str = RAG_EVALS_TOPIC  # eval runs' figures (scripts.eval_rag), exported for this index
    partitions: int = 3
    # Documents read per poll: embedding them holds up the queries behind them (about 1 s per 16 on 2 CPU cores).
    documents_batch_size: int = 16
    max_document_chars: int = 100_000  # longer documents are refused (DLQ): split them
    # MiniLM reads at most 256 tokens: a longer chunk's tail would never reach its vector.
    chunk_tokens: int = 256
    overlap_tokens: int = 32
    embed_batch_size: int = 64
    shards: int = 4
    candidates: int = 100
    ann_min_chunks: int = 20_000  # a shard's chunks from which dense search is approximate (0: never)
    context_docs: int = 3
    support_threshold: float = 0.45
    # BM25's term-frequency saturation and length normalisation (statistics per shard).
    bm25_k1: float = ShardIndex.k1
    bm25_b: float = ShardIndex.b
    # How the two rankings become one: "rrf" (weighted reciprocal rank, rrf_k) or "dbsf"
    # (distribution-based score fusion, Qdrant's); both weigh each ranking. See Fusion.
    fusion: str = Fusion.method
    dense_weight: float = Fusion.dense_weight
    bm25_weight: float = Fusion.bm25_weight
    rrf_k: int = Fusion.rrf_k
    llm_url: str = ""  # an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1; empty: extractive answers
    llm_model: str = ""
    llm_timeout_s: float = 30.0
    state_dir: Path = Path("var/state/rag")
    metrics_port: int = 9106

    def __post_init__(self) -> None:
        if self.llm_url and not self.llm_model:
            raise ValueError("RAG_LLM_URL is set but RAG_LLM_MODEL is not: name the model the server serves")
        _ = self.fusion_config  # RAG_FUSION names a method Fusion knows, or the dataflow does not start

    @property
    def fusion_config(self) -> Fusion:
        return Fusion(self.dense_weight, self.bm25_weight, self.rrf_k, self.fusion)

    def topics(self) -> list[TopicSpec]:
        return [
            # Compacted: the topic keeps each document's last version, so an index can be rebuilt from it.
            TopicSpec(self.documents_topic, partitions=self.partitions, cleanup_policy="compact"),
            TopicSpec(self.queries_topic, partitions=self.partitions, retention_ms=HOUR_MS),
            TopicSpec(self.answers_topic, partitions=8, retention_ms=HOUR_MS),
            TopicSpec(self.evals_topic, cleanup_policy="compact"),
            *(
                TopicSpec(t + DLQ_SUFFIX, retention_ms=-1)
                for t in (self.documents_topic, self.queries_topic, self.evals_topic)
            ),
        ]


def generator(s: Settings, extractive: Extractive) -> Generator:
    """The extractive generator, or an OpenAI-compatible server that falls back to it."""
    if not s.llm_url:
        return extractive
    key = os.environ.get("RAG_LLM_API_KEY", "")
    return OpenAIChat(s.llm_url, s.llm_model, extractive, api_key=key, timeout_s=s.llm_timeout_s)


def build(settings: Settings | None = None) -> Dataflow:
    s = settings or from_env(Settings, prefix="RAG_")
    app = Application.start(s, s.topics())
    spec = get_spec("minilm-embeddings")
    minilm = spec.load()

    def embed(texts: list[str]) -> np.ndarray:
        return minilm.forward(texts)["embedding"]

    encoder = minilm.model  # type: ignore[attr-defined]
    chunker = Chunker(encoder.tokenizer, s.chunk_tokens, s.overlap_tokens)
    dim = embed(["dimension"]).shape[1]  # sentence-transformers renamed the method that says it
    version = index_version(f"{spec.name}@{spec.version}", chunker, s.fusion_config, (s.bm25_k1, s.bm25_b))
    generate = generator(s, Extractive(embed, s.support_threshold))
    answering = Answering(s.fusion_config, generate, s.candidates, s.context_docs, version)
    metrics.RAG_INDEX.info({"version": version})
    rules = app.reply_rules(s.answers_topic, s.reply_topics, s.topics(), "RAG_REPLY_TOPICS")
    state = StateConfig(s.state_dir, shards=s.shards)

    flow = Dataflow("rag")

    doc_source = app.source([s.documents_topic], batch_size=s.documents_batch_size)
    documents = try_map(
        "parse_documents",
        op.input("documents", flow, doc_source),
        lambda msg: parse_document(msg, s.max_document_chars),
    )
    # Document | Deletion
    changed = keyed_state("catalog", op.key_on("by_doc", documents.oks, lambda d: d.doc_id), Catalog, state)
    # (document id, Document | Deletion): only documents whose content changed
    updates = op.flat_map_batch(
        "embed", changed, lambda batch: embed_documents(batch, chunker, embed, s.embed_batch_size, s.shards)
    )
    # (shard, (shard, document id, Indexed | Deletion))

    query_source = app.source([s.queries_topic], batch_size=256)
    queries = try_map("parse_queries", op.input("queries", flow, query_source), lambda m: parse_query(m, rules))
    valid = split("valid", queries.oks, Query, Reply)
    # Query | Reply (error)
    fanned = op.flat_map_batch("embed_queries", valid.first, lambda batch: _fan_out(batch, embed, s.shards))
    # (shard, (shard, query key, Query)): every query to every shard
    shard = partial(IndexShard, dim, s.candidates, k1=s.bm25_k1, b=s.bm25_b, ann_min=s.ann_min_chunks)
    hits = sharded_state("index", op.merge("to_index", updates, fanned), shard, state)
    # (query key, ShardHits)
    gathered = op.stateful_flat_map("gather", hits, gather(s.shards))
    # (query key, [ShardHits of every shard])
    answered = op.flat_map_batch("answer", op.key_rm("unkey", gathered), lambda batch: answer(batch, answering))
    # Reply
    evals = try_map("parse_evals", op.input("evals", flow, app.source([s.evals_topic], batch_size=256)), EvalRun.parse)
    op.inspect("export_evals", evals.oks, lambda _step, run: run.export(version))
    parse_step = "rag.parse_queries"
    invalid = op.flat_map("answer_invalid", valid.rest, lambda reply: error_and_dead_letter(parse_step, reply))
    replies = op.map("encode", answered, Reply.to_message)
    dead = op.map("dead", op.merge("errs", documents.errs, queries.errs, evals.errs), to_dlq_message)
    # KafkaMessage: replies on their reply topics, dead letters on <input topic>.dlq
    # What the broker refuses to take is a reply (say, to a topic deleted since): the queries' DLQ.
    kafka_output("publish", op.merge("out", replies, invalid, dead), app.sink(dlq_topic=s.queries_topic + DLQ_SUFFIX))
    return flow


def _fan_out(batch: list[Query], embed: Callable[[list[str]], np.ndarray], shards: int) -> list[tuple[str, Any]]:
    """The batch's queries embedded in one forward pass, each addressed to every shard."""
    vectors = embed([q.text for q in batch])
    embedded = [replace(q, vector=v) for q, v in zip(batch, vectors, strict=True)]
    return [(str(shard), (str(shard), q.key, q)) for q in embedded for shard in range(shards)]
