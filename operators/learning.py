"""Online models in a dataflow: score first, learn later, recovered exactly after a kill.

:func:`online_model` keeps a river model per key (a metric series, or a model
shard) and takes two kinds of commands in order: :class:`Score` (emit the
model's score for the features now) and :class:`Learn` (update the model with
the features and, for a classifier, the label). Scoring before learning the
same features gives a prequential evaluation: every score comes from a model
that had not seen the item. Labels can come much later (a chargeback days
after a payment): send the :class:`Learn` when they do.

A model is a Python object that changes with every item, too costly to write
to RocksDB per item. Keys are hashed onto ``shards``; a shard's models live in
memory and are pickled into Bytewax's recovery store at each snapshot, so after
a kill -9 they are the models of the last snapshot and the replayed input is
learned once. Every execution wakes every shard (see :mod:`operators.stateful`),
so no shard resumes from a dead run's snapshot. A key idle for ``ttl_ms`` of
system time is forgotten at the next snapshot.

With ``label_of``, each scored item whose label is known updates the key's
prequential ROC-AUC and PR-AUC over its last 10,000 labels, exported as
``patternflow_model_roc_auc{step,key}`` and ``patternflow_model_pr_auc{step,key}``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import bytewax.operators as op
from bytewax.dataflow import operator
from bytewax.operators import KeyedStream, StatefulBatchLogic

from models.quality import Prequential
from operators import metrics
from operators.stateful import Wake, woken
from patternflow import hash_key, wall_ms

__all__ = ["Learn", "ModelSpec", "Score", "Scored", "online_model"]

V = TypeVar("V")


class Score(NamedTuple):
    features: dict[str, float]
    item: Any  # passed through to the output


class Learn(NamedTuple):
    features: dict[str, float]
    label: Any = None  # None for unsupervised models


@dataclass(frozen=True)
class Scored(Generic[V]):
    item: V
    score: float


@dataclass(frozen=True)
class ModelSpec:
    """How to build, score and update one model: ``make()`` a fresh river model;
    ``score(model, features)`` a float, higher is more anomalous (or more likely positive);
    ``learn(model, features, label)``."""

    make: Callable[[], Any]
    score: Callable[[Any, dict[str, float]], float]
    learn: Callable[[Any, dict[str, float], Any], None]


@dataclass
class _Keyed:
    model: Any
    seen_ms: int
    quality: Prequential | None = None


class _Shard(StatefulBatchLogic[Any, tuple[str, Scored[Any]], bytes]):
    def __init__(
        self,
        step_id: str,
        spec: ModelSpec,
        shards: int,
        label_of: Callable[[Any], int | None] | None,
        ttl_ms: int | None,
        now_ms: Callable[[], int],
        resume: bytes | None,
    ) -> None:
        self._step_id, self._spec, self._label_of, self._ttl_ms = step_id, spec, label_of, ttl_ms
        self._shards, self._shard = shards, ""
        self._now_ms = now_ms
        self._keys: dict[str, _Keyed] = pickle.loads(resume) if resume else {}

    def on_batch(self, values: list[Any]) -> tuple[list[tuple[str, Scored[Any]]], bool]:
        out = []
        now = self._now_ms()
        for value in values:
            if isinstance(value, Wake):
                continue
            key, command = value
            self._shard = self._shard or str(hash_key(key) % self._shards)
            keyed = self._keys.get(key)
            if keyed is None:
                keyed = self._keys[key] = _Keyed(self._spec.make(), now)
            keyed.seen_ms = now
            if isinstance(command, Learn):
                self._spec.learn(keyed.model, command.features, command.label)
                continue
            score = float(self._spec.score(keyed.model, command.features))
            out.append((key, Scored(command.item, score)))
            label = self._label_of(command.item) if self._label_of else None
            if label is not None:
                keyed.quality = keyed.quality or Prequential()
                if keyed.quality.add(bool(label), score):
                    metrics.model_quality(self._step_id, key, keyed.quality)
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        if self._ttl_ms is not None:
            oldest = self._now_ms() - self._ttl_ms
            self._keys = {key: keyed for key, keyed in self._keys.items() if keyed.seen_ms >= oldest}
        if self._shard:
            metrics.STATE_KEYS.labels(self._step_id, self._shard).set(len(self._keys))
        return pickle.dumps(self._keys)


@operator
def online_model(
    step_id: str,
    up: KeyedStream[Score | Learn],
    spec: ModelSpec,
    *,
    shards: int = 8,
    label_of: Callable[[Any], int | None] | None = None,
    ttl_ms: int | None = None,
    now_ms: Callable[[], int] = wall_ms,
) -> KeyedStream[Scored[Any]]:
    """Run each key's :class:`Score` and :class:`Learn` commands, in order, against its model."""
    sharded = op.map("shard", up, lambda kv: (str(hash_key(kv[0]) % shards), kv))
    # (shard, (key, command)); every shard woken in each execution's first epoch
    outs = op.stateful_batch(
        "models", woken(sharded, shards), lambda resume: _Shard(step_id, spec, shards, label_of, ttl_ms, now_ms, resume)
    )
    return op.map("unshard", outs, lambda shard_out: shard_out[1])
