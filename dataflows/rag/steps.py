"""The steps of the RAG dataflow (:mod:`dataflows.rag`): documents and queries in, cited answers out.

Documents, on ``rag.documents``: the key is the document id (UTF-8, 1 to 256
bytes), the value ``{"text": str, "title": str, "metadata": {name: value}}``
(``title`` and ``metadata`` optional; a metadata value is a string, number,
boolean or null, or a list of them). A message with the same key replaces the
document; a tombstone (no value) deletes it.

Queries, on ``rag.queries``: the online-inference protocol (:mod:`operators.protocol`:
the ``correlation_id``, ``reply_topic``, ``reply_partition`` and ``deadline_ms``
headers), with the value ``{"model": "rag", "inputs": {"query": str, "k": int,
"filters": {name: value or [values]}, "answer": bool}}`` (``k``, 1 to 100, defaults
to 10; a filter keeps the chunks whose metadata value equals the value, or one
of the values; ``"answer": false`` asks for the hits only; ``"retriever"``:
``"dense"`` or ``"bm25"`` ranks by one retriever alone, for evaluation). The reply's
``outputs`` are ``{"query", "filters", "hits", "answer"}``: the top ``k``
documents, each with the chunk that ranked it (its id and character offsets in
the document's text), and the answer, each sentence cited.

Steps: :class:`Catalog` keeps each document's content hash and passes on only
real changes, so an unchanged document is never embedded again; :func:`embed_documents`
chunks and embeds them in micro-batches; :class:`IndexShard` keeps its shard's
chunks in keyed state and in a :class:`~dataflows.rag.retrieval.ShardIndex` rebuilt
from that state when the shard opens, and answers each query with its top hits
by vector and by BM25; :func:`gather` waits for every shard's hits;
:func:`answer` fuses them and has the generator answer.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import orjson

from dataflows.rag.answers import Generator, Question
from dataflows.rag.retrieval import Fusion, Hit, IndexedChunk, ShardIndex, rank
from dataflows.rag.text import Chunker, terms
from operators import metrics
from operators.dlq import loads_json
from operators.kafka.message import KafkaMessage
from operators.protocol import RAG_MODEL, ReplyRules, deadline_ms, id_from_key
from operators.serving import Reply, Request, answerable
from operators.stateful import Expiring, shard_of
from patternflow import InvalidMessage, wall_ms
from state import StateStore

__all__ = [
    "Answering",
    "Catalog",
    "Deletion",
    "Document",
    "EvalRun",
    "IndexShard",
    "Indexed",
    "Query",
    "ShardHits",
    "answer",
    "embed_documents",
    "gather",
    "index_version",
    "parse_document",
    "parse_query",
]

MAX_QUERY_CHARS = 2_000
MAX_K = 100
MAX_FILTERS = 16
RETRIEVERS = ("hybrid", "dense", "bm25")  # dense and bm25 alone are for evaluation and debugging

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str
    metadata: Mapping[str, Any]
    produced_ms: int

    @property
    def content_hash(self) -> str:
        doc = orjson.dumps([self.title, self.text, self.metadata], option=orjson.OPT_SORT_KEYS)
        return hashlib.blake2b(doc, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Deletion:
    doc_id: str
    produced_ms: int


@dataclass(frozen=True)
class Indexed:
    """A document's chunks, embedded: they replace all its chunks in the index."""

    doc_id: str
    chunks: tuple[IndexedChunk, ...]
    produced_ms: int


@dataclass(frozen=True)
class Query:
    key: str  # the query message's partition and offset: unique, and the same when replayed
    request: Request
    text: str
    k: int
    filters: Mapping[str, Any]
    answer: bool = True  # False: the hits only
    retriever: str = "hybrid"
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class ShardHits:
    """One shard's best hits for a query, by each retriever."""

    query: Query
    dense: tuple[Hit, ...]
    bm25: tuple[Hit, ...]


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _metadata(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidMessage(f"{what} must be a JSON object, got {type(value).__name__}")
    for name, item in value.items():
        if not (_scalar(item) or (isinstance(item, list) and all(_scalar(x) for x in item))):
            raise InvalidMessage(f"{what} {name!r} must be a string, number, boolean or null, or a list of them")
    return value


def _fields(doc: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InvalidMessage(f"{what} has unknown field(s) {unknown}; it takes {sorted(allowed)}")


def parse_document(msg: KafkaMessage, max_chars: int) -> Document | Deletion:
    """A document or a deletion; :class:`InvalidMessage` says what is wrong with the message.
    A text over ``max_chars`` characters is refused: embedding it would hold up every query."""
    doc_id = id_from_key(msg.key, "document id", "a document message")
    produced_ms = msg.timestamp_ms or wall_ms()
    if msg.value is None:
        return Deletion(doc_id, produced_ms)
    doc = loads_json(msg.value)
    if isinstance(doc, dict):
        _fields(doc, {"text", "title", "metadata"}, "a document")  # first: a misspelt field is named
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise InvalidMessage('a document is a JSON object {"text": str, "title": str, "metadata": {...}}')
    if len(doc["text"]) > max_chars:
        raise InvalidMessage(f"text is {len(doc['text']):,} characters, over the {max_chars:,} limit: split it")
    title = doc.get("title") or ""
    if not isinstance(title, str):
        raise InvalidMessage(f"title must be a string, got {type(title).__name__}")
    return Document(doc_id, title, doc["text"], _metadata(doc.get("metadata") or {}, "metadata"), produced_ms)


def index_version(model: str, chunker: Chunker, fusion: Fusion, bm25: tuple[float, float] = (1.5, 0.75)) -> str:
    """What an eval run's figures hold for: the embedding model's version, the chunking,
    BM25's ``(k1, b)`` and the fusion. A run recorded for another version says nothing about this index."""
    return (
        f"{model}/chunks {chunker.chunk_tokens}+{chunker.overlap_tokens}"
        f"/bm25 {bm25[0]:g}:{bm25[1]:g}/fusion {fusion.describe()}"
    )


MAX_EVAL_FIGURES = 64  # each a gauge: a record cannot make thousands


@dataclass(frozen=True)
class EvalRun:
    """A retrieval eval run's figures (``scripts.eval_rag``), recorded on the compacted evals
    topic under its index version and split; the RAG dataflow exports the latest for its own."""

    index_version: str
    split: str
    queries: int
    figures: dict[str, float]
    recorded_ms: int

    def to_message(self, topic: str) -> KafkaMessage:
        key = f"{self.index_version}|{self.split}".encode()
        return KafkaMessage(orjson.dumps(self.__dict__), key=key, topic=topic)

    @classmethod
    def parse(cls, msg: KafkaMessage) -> EvalRun:
        """The run a message holds; :class:`InvalidMessage` says what is wrong with it."""
        doc = loads_json(msg.value or b"")

        def number(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        shape = '{"index_version": str, "split": str, "queries": int, "figures": {str: number}, "recorded_ms": int}'
        if not (
            isinstance(doc, dict)
            and set(doc) == set(cls.__dataclass_fields__)
            and isinstance(doc["index_version"], str)
            and isinstance(doc["split"], str)
            and all(isinstance(doc[k], int) and not isinstance(doc[k], bool) for k in ("queries", "recorded_ms"))
            and isinstance(doc["figures"], dict)
            and len(doc["figures"]) <= MAX_EVAL_FIGURES
            and all(len(k) <= 64 and number(v) for k, v in doc["figures"].items())
            and len(doc["index_version"]) <= 300
            and len(doc["split"]) <= 64
        ):
            raise InvalidMessage(f"an eval run is a JSON object {shape} (at most {MAX_EVAL_FIGURES} figures)")
        return cls(**doc)

    def export(self, serving: str) -> None:
        """Set the eval gauges, if the run is of the index version ``serving``."""
        if self.index_version == serving:
            for metric, value in self.figures.items():
                metrics.RAG_EVAL.labels(self.split, metric).set(value)
            metrics.RAG_EVAL_TIME.labels(self.split).set(self.recorded_ms / 1000)


def parse_query(msg: KafkaMessage, rules: ReplyRules, now_ms: Callable[[], int] = wall_ms) -> Query | Reply:
    """A query, or an ``error`` :class:`~operators.serving.Reply` carrying the message for
    the DLQ; :class:`InvalidMessage` when the message names no valid place to reply."""
    request = answerable(msg, rules, now_ms, RAG_MODEL)
    try:
        doc = loads_json(msg.value or b"")
        if not isinstance(doc, dict) or doc.get("model") != RAG_MODEL or not isinstance(doc.get("inputs"), dict):
            raise InvalidMessage('a query is {"model": "rag", "inputs": {"query": str, "k": int, "filters": {...}}}')
        inputs = doc["inputs"]
        _fields(inputs, {"query", "k", "filters", "answer", "retriever"}, "inputs")
        text, k = inputs.get("query"), inputs.get("k", 10)
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_QUERY_CHARS:
            raise InvalidMessage(f"query must be a non-empty string of at most {MAX_QUERY_CHARS} characters")
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise InvalidMessage(f"k must be an integer from 1 to {MAX_K}, got {k!r:.40}")
        if not isinstance(inputs.get("answer", True), bool):
            raise InvalidMessage("answer must be true or false")
        retriever = inputs.get("retriever", "hybrid")
        if retriever not in RETRIEVERS:
            raise InvalidMessage(f"retriever must be one of {list(RETRIEVERS)}, got {retriever!r:.40}")
        filters = _metadata(inputs.get("filters") or {}, "filter")
        if len(filters) > MAX_FILTERS:
            raise InvalidMessage(f"at most {MAX_FILTERS} filters, got {len(filters)}")
        request = replace(request, inputs=inputs, deadline_ms=deadline_ms(msg))
        answer = inputs.get("answer", True)
        return Query(f"{msg.partition}:{msg.offset}", request, text, k, filters, answer, retriever)
    except InvalidMessage as exc:
        return Reply(replace(request, source=msg), "error", error=f"{type(exc).__name__}: {exc}")


class Catalog(Expiring[Document | Deletion]):
    """Each document's content hash, by document id: passes on a document only when it
    changed, and a deletion only of a document it holds."""

    def on_item(self, store: StateStore, key: str, value: Document | Deletion) -> Iterable[tuple[str, Any]]:
        held = store.get(key)
        if isinstance(value, Deletion):
            if held is None:
                return ()
            store.delete(key)
            return ((key, value),)
        content = value.content_hash
        if held == content:
            metrics.ITEMS.labels("rag.catalog", "unchanged").inc()
            return ()
        store.put(key, content)
        return ((key, value),)


def embed_documents(
    changes: list[tuple[str, Document | Deletion]], chunker: Chunker, embed: Embed, batch_size: int, shards: int
) -> list[tuple[str, tuple[str, str, Indexed | Deletion]]]:
    """Documents chunked and embedded, ``batch_size`` chunks per forward pass, each
    addressed to its document's index shard; deletions pass through."""
    start = time.perf_counter()
    pieces = [
        (i, doc, chunk, f"{doc.title}\n{chunk.text}" if doc.title else chunk.text)
        for i, (_, doc) in enumerate(changes)
        if isinstance(doc, Document)
        for chunk in chunker.chunks(doc.text)
    ]
    texts = [text for *_, text in pieces]
    vectors = (v for i in range(0, len(texts), batch_size) for v in embed(texts[i : i + batch_size]))
    # By position in the batch: two versions of one document each keep their own chunks.
    chunks: dict[int, list[IndexedChunk]] = {}
    for (i, doc, chunk, _), vector in zip(pieces, vectors, strict=True):
        chunks.setdefault(i, []).append(
            IndexedChunk(
                f"{doc.doc_id}#{chunk.index}", doc.doc_id, doc.title, chunk.text, chunk.start, chunk.end,
                doc.metadata, vector,
            )
        )  # fmt: skip
    out = []
    for i, (doc_id, change) in enumerate(changes):
        update = (
            Indexed(doc_id, tuple(chunks.get(i, ())), change.produced_ms) if isinstance(change, Document) else change
        )
        shard = shard_of(doc_id, shards)
        out.append((shard, (shard, doc_id, update)))
    # The embedding stage's own rate: documents over these seconds.
    metrics.ITEMS.labels("rag.embed", "ok").inc(len(changes))
    metrics.STEP_SECONDS.labels("rag.embed").observe(time.perf_counter() - start)
    return out


def _to_state(chunk: IndexedChunk) -> dict[str, Any]:
    return {
        "doc": chunk.doc_id,
        "title": chunk.title,
        "text": chunk.text,
        "start": chunk.start,
        "end": chunk.end,
        "metadata": chunk.metadata,
        "vector": base64.b64encode(chunk.vector.astype(np.float32).tobytes()).decode(),
    }


def _from_state(chunk_id: str, doc: dict[str, Any]) -> IndexedChunk:
    text, title = doc["text"], doc["title"]
    return IndexedChunk(
        chunk_id, doc["doc"], title, text, doc["start"], doc["end"], doc["metadata"],
        np.frombuffer(base64.b64decode(doc["vector"]), dtype=np.float32),
    )  # fmt: skip


@dataclass
class IndexShard(Expiring[Any]):
    """One index shard. State: ``c:<chunk id>`` -> the chunk, ``d:<document id>`` -> its chunk ids.
    A query gets the shard's top ``candidates`` (at least its ``k``) by vector and by BM25,
    the first ``with_text`` of each with their text."""

    dim: int
    candidates: int = 100
    with_text: int = 10
    k1: float = ShardIndex.k1
    b: float = ShardIndex.b
    ann_min: int = ShardIndex.ann_min
    _index: ShardIndex | None = None

    def _open(self, store: StateStore) -> ShardIndex:
        if self._index is None:
            self._index = ShardIndex(self.dim, self.k1, self.b, ann_min=self.ann_min)
            for key, doc in store.items("c:"):
                self._index.add(_from_state(key[2:], doc))
        return self._index

    def on_item(self, store: StateStore, key: str, value: Indexed | Deletion | Query) -> Iterable[tuple[str, Any]]:
        index = self._open(store)
        if isinstance(value, Query):
            return ((key, self.search(index, value)),)
        for chunk_id in store.get("d:" + key) or ():
            index.remove(chunk_id)
            store.delete("c:" + chunk_id)
        if isinstance(value, Deletion) or not value.chunks:
            store.delete("d:" + key)
            return ()
        for chunk in value.chunks:
            index.add(chunk)
            store.put("c:" + chunk.chunk_id, _to_state(chunk))
        store.put("d:" + key, [chunk.chunk_id for chunk in value.chunks])
        return ()

    def search(self, index: ShardIndex, query: Query) -> ShardHits:
        assert query.vector is not None, "queries are embedded before they fan out"
        allowed, k = index.allowed(query.filters), max(query.k, self.candidates)
        dense, bm25 = index.search(query.vector, terms(query.text), k, allowed, self.with_text)
        return ShardHits(query, dense, bm25)


def gather(
    shards: int,
) -> Callable[[list[ShardHits] | None, ShardHits], tuple[list[ShardHits] | None, list[list[ShardHits]]]]:
    """A ``stateful_flat_map`` mapper, keyed by query: every shard's hits, once all are in."""

    def mapper(held: list[ShardHits] | None, hits: ShardHits) -> tuple[list[ShardHits] | None, list[list[ShardHits]]]:
        parts = [*(held or ()), hits]
        return (None, [parts]) if len(parts) == shards else (parts, [])

    return mapper


@dataclass(frozen=True)
class Answering:
    """How gathered hits become a reply: ``candidates`` documents per retriever are fused,
    the top ``context_docs`` of them are the generator's context."""

    fusion: Fusion
    generator: Generator
    candidates: int = 100
    context_docs: int = 3
    index_version: str = ""
    now_ms: Callable[[], int] = wall_ms


def _hit_json(hit: Hit, score: float) -> dict[str, Any]:
    return {
        "doc_id": hit.doc_id,
        "chunk_id": hit.chunk_id,
        "title": hit.title,
        "score": score,
        "start": hit.start,
        "end": hit.end,
    }


def answer(gathered: list[list[ShardHits]], how: Answering) -> list[Reply]:
    """A reply for each query whose hits are all in: fused hits and the generator's answer
    (one generator call for the batch); ``timeout`` for a query past its deadline."""
    replies, questions, ranked = [], [], []
    for parts in gathered:
        query = parts[0].query
        request = query.request
        if request.deadline_ms is not None and request.deadline_ms <= how.now_ms():
            replies.append(Reply(request, "timeout", error="deadline passed before the answer"))
            continue
        dense = (h for part in parts for h in part.dense)
        bm25 = (h for part in parts for h in part.bm25)
        fused = rank(dense, bm25, query.retriever, how.fusion, how.candidates, query.k)
        contexts = tuple(hit for hit, _ in fused[: how.context_docs] if hit.text is not None)
        assert query.vector is not None
        if query.answer:
            questions.append(Question(query.text, query.vector, contexts))
        ranked.append((query, fused, how.now_ms()))
    start = time.perf_counter()
    answers = iter(how.generator.answer(questions) if questions else [])
    generate_ms = (time.perf_counter() - start) * 1000
    for query, fused, retrieved_ms in ranked:
        request = query.request
        outputs = {"query": query.text, "filters": query.filters, "hits": [_hit_json(h, score) for h, score in fused]}
        if query.answer:
            outputs["answer"] = next(answers).to_json()
        timings: dict[str, float] = {
            "queue": request.read_ms - request.sent_ms,
            "retrieve": retrieved_ms - request.read_ms,
        }
        if query.answer:
            timings["generate"] = generate_ms
        version = how.index_version
        reply = Reply(request, "ok", outputs=outputs, version=version, timings_ms=timings, batch_size=len(questions))
        replies.append(reply)
    return replies
