"""Retrieval data sets in BEIR's format, for the retrieval eval suite and the benchmarks.

A BEIR directory holds ``corpus.jsonl[.gz]`` (``{"_id", "title", "text"}``),
``queries.jsonl`` (``{"_id", "text"}``) and ``qrels/<split>.tsv`` (query id,
document id, graded relevance, with a header line). SciFact (in the workspace's
shared data) is one: tune on ``train``, report ``test``.

    python -m scripts.beir     # what the SciFact directory holds, in numbers
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import orjson

__all__ = ["SCIFACT", "Beir", "load"]

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


@dataclass(frozen=True)
class Beir:
    corpus: dict[str, dict[str, str]]  # document id -> {"title", "text"}
    queries: dict[str, str]  # query id -> text
    qrels: dict[str, dict[str, dict[str, int]]]  # split -> query id -> document id -> relevance

    def split(self, name: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
        """The judged queries of one split (``train``, ``test``) and their judgements."""
        if name not in self.qrels:
            raise KeyError(f"no split {name!r}; the data set has {sorted(self.qrels)}")
        judged = self.qrels[name]
        return {qid: self.queries[qid] for qid in judged}, judged


def load(path: Path = SCIFACT) -> Beir:
    """Read a BEIR directory; a ``FileNotFoundError`` names what is missing."""
    corpus_file = next((p for p in (path / "corpus.jsonl.gz", path / "corpus.jsonl") if p.exists()), None)
    if corpus_file is None or not (path / "queries.jsonl").exists():
        raise FileNotFoundError(f"{path} is not a BEIR directory: it needs corpus.jsonl[.gz] and queries.jsonl")
    opener = gzip.open if corpus_file.suffix == ".gz" else open
    with opener(corpus_file, "rb") as f:
        docs = (orjson.loads(line) for line in f if line.strip())
        corpus = {str(d["_id"]): {"title": d.get("title") or "", "text": d.get("text") or ""} for d in docs}
    with open(path / "queries.jsonl", "rb") as f:
        queries = {str(q["_id"]): q["text"] for q in (orjson.loads(line) for line in f if line.strip())}
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    for tsv in sorted((path / "qrels").glob("*.tsv")):
        with open(tsv, newline="") as f:
            rows = csv.reader(f, delimiter="\t")
            next(rows, None)  # the header
            split = qrels.setdefault(tsv.stem, {})
            for qid, doc, score in rows:
                split.setdefault(qid, {})[doc] = int(score)
    return Beir(corpus, queries, qrels)


def main() -> None:
    data = load()
    splits = ", ".join(f"{name}: {len(judged):,} queries" for name, judged in data.qrels.items())
    print(f"{SCIFACT}: {len(data.corpus):,} documents, {len(data.queries):,} queries; judged: {splits}")


if __name__ == "__main__":
    main()
