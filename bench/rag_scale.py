"""RAG index at scale: a shard's approximate dense search against exact search, on one core.

One index shard (:class:`dataflows.rag.steps.IndexShard`, the dataflow's) is filled
with ``chunks`` chunks through its keyed state in RocksDB, as the dataflow fills
it, then opened again from that state as after a restart (``restore_s``: reading
every chunk back, and the first query building the approximate index over them).
Then 200 queries ask for the shard's top 100 by vector, as the dataflow asks each
shard: through the approximate index (usearch HNSW, int8, candidates re-scored
exactly) and exactly (every vector scored), in the same process, on one core.

The vectors are synthetic: 384 dimensions (MiniLM's), unit length, drawn around
``chunks / 100`` random centres so that a query's ten nearest chunks are close calls
(their cosine similarities within a few hundredths of each other, as with real
embeddings of a corpus). The chunks carry no text: BM25 is not part of this
benchmark.

    python -m bench.rag_scale            # 1,000,000 chunks
    python -m bench.rag_scale --quick    # 100,000 chunks
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ.setdefault(_var, "1")

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.report import parse_args, progress, write_report  # noqa: E402
from dataflows.rag.retrieval import IndexedChunk, ShardIndex  # noqa: E402
from dataflows.rag.steps import Indexed, IndexShard  # noqa: E402
from state import RocksDBBackend, StateStore  # noqa: E402

DIM = 384
QUERIES = 200
K = 100  # what the dataflow asks each shard for (RAG_CANDIDATES)
BATCH = 50_000


def vectors(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 0.052 * rng.standard_normal((n, DIM), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fill(path: Path, rng: np.random.Generator, centres: np.ndarray, chunks: int) -> None:
    """The chunks into a shard's keyed state, as the dataflow writes them."""
    store, shard = StateStore(RocksDBBackend(path)), IndexShard(DIM, ann_min=0)
    for start in range(0, chunks, BATCH):
        for i, vector in enumerate(vectors(rng, centres, min(BATCH, chunks - start)), start):
            chunk = IndexedChunk(f"c{i}#0", f"c{i}", "", "", 0, 0, {}, vector)
            list(shard.on_item(store, f"c{i}", Indexed(f"c{i}", (chunk,), 0)))
        store.commit()
        progress(f"{min(start + BATCH, chunks):,} chunks written")
    store.close()


def latencies_ms(index: ShardIndex, queries: np.ndarray) -> tuple[list[list[int]], list[float]]:
    found, took = [], []
    for query in queries:
        start = time.perf_counter()
        top = index.dense(query, K, None)
        took.append((time.perf_counter() - start) * 1000)
        found.append([slot for slot, _ in top])
    return found, took


def main() -> None:
    args = parse_args(__doc__)
    chunks = 100_000 if args.quick else 1_000_000
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((chunks // 100, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    tmp = Path(tempfile.mkdtemp(prefix="rag-scale-"))
    try:
        progress(f"writing {chunks:,} chunks into a shard's state")
        fill(tmp / "shard", rng, centres, chunks)
        queries = vectors(rng, centres, QUERIES)
        progress("opening the shard from its state, as after a restart, and building its approximate index")
        before, start = rss_bytes(), time.perf_counter()
        store = StateStore(RocksDBBackend(tmp / "shard"))
        index = IndexShard(DIM)._open(store)
        index.dense(queries[0], K, None)
        restore_s = time.perf_counter() - start
        held = rss_bytes() - before
        progress(f"{QUERIES} queries, approximate then exact")
        approx, approx_ms = latencies_ms(index, queries)
        index.ann_min = 0
        exact, exact_ms = latencies_ms(index, queries)
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    recall = [len(set(a[:10]) & set(e[:10])) / 10 for a, e in zip(approx, exact, strict=True)]
    result = {
        "chunks": chunks,
        "recall10_vs_exact": round(float(np.mean(recall)), 4),
        "query_p95_ms": round(float(np.percentile(approx_ms, 95)), 2),
        "exact_query_p95_ms": round(float(np.percentile(exact_ms, 95)), 2),
        "bytes_per_chunk": round(held / chunks),
        "ann_bytes_per_chunk": round(index.ann_bytes / chunks),
        "restore_s": round(restore_s, 1),
    }
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(["approximate, re-scored", "exact"], [result["query_p95_ms"], result["exact_query_p95_ms"]])
    ax.set_xlabel(f"p95 ms per query (top {K}, one core)")
    ax.set_title(f"{chunks:,} chunks in one shard: recall@10 {result['recall10_vs_exact']} against exact")
    fig.tight_layout()
    notes = [
        f"One shard of {chunks:,} synthetic 384-dimensional unit vectors around {chunks // 100:,} centres; queries "
        f"on one core (BLAS and usearch on one thread), the graph built at open on every core ({os.cpu_count()} "
        "here). `bytes_per_chunk`: what the process grew by, opening the shard from its "
        "state (the float32 vectors, the chunks' records, the approximate index: `ann_bytes_per_chunk`); the "
        "chunks carry no text, so BM25 postings are not in it. `restore_s`: reading every chunk back from RocksDB "
        "and building the approximate index, which the first query does.",
        "",
    ]
    write_report("rag_scale", "RAG index at scale: approximate against exact dense search", fig, notes, result,
                 quick=args.quick)  # fmt: skip


if __name__ == "__main__":
    main()
