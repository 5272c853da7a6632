"""Topics declared in code, created idempotently, and looked up (no Bytewax here).

- :class:`TopicSpec` and :func:`ensure_topics`: what a dataflow creates at start.
- :func:`wait_for_topics`: what a client calls when it may start before the
  dataflow that creates its topics.
- :class:`TopicCache`: partition counts and cleanup policies from the broker, cached, for
  checking a destination that a message names before anything is produced there.

Every broker call retries transient errors through :class:`~operators.kafka.client.Outage`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from operators.kafka.client import DEFAULT_OUTAGE_LIMIT_S, Outage, admin_config
from operators.kafka.errors import KafkaAdminError, is_transient

__all__ = [
    "TopicCache",
    "TopicInfo",
    "TopicSpec",
    "ensure_topics",
    "partition_count",
    "valid_topic_name",
    "wait_for_topics",
]

log = logging.getLogger("patternflow.kafka")
# Kafka's own rule (org.apache.kafka.common.internals.Topic): 1-249 of these characters, not "." or "..".
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


def valid_topic_name(name: str) -> bool:
    """Whether Kafka accepts ``name`` as a topic name."""
    return bool(_TOPIC_NAME.fullmatch(name)) and name not in (".", "..")


@dataclass(frozen=True)
class TopicSpec:
    """A topic as the code declares it; ``retention_ms=-1`` keeps messages forever."""

    name: str
    partitions: int = 1
    cleanup_policy: Literal["delete", "compact", "compact,delete"] = "delete"
    retention_ms: int = 7 * 24 * 3600 * 1000
    config: Mapping[str, str] = field(default_factory=dict)

    def new_topic(self) -> NewTopic:
        config = {"cleanup.policy": self.cleanup_policy, "retention.ms": str(self.retention_ms), **self.config}
        return NewTopic(self.name, num_partitions=self.partitions, replication_factor=1, config=config)


def _admin(brokers: str) -> AdminClient:
    return AdminClient(admin_config(brokers))


def _topics(admin: AdminClient, outage: Outage, timeout_s: float = 5.0) -> dict[str, Any]:
    """Topic name -> metadata of the topics that exist and have partitions."""
    meta = outage.call(lambda: _listed(admin, timeout_s))
    return {name: t for name, t in meta.topics.items() if t.error is None and t.partitions}


def _listed(admin: AdminClient, timeout_s: float) -> Any:
    """The cluster's metadata. The poll first runs the client's error callback, which raises
    :class:`~operators.kafka.errors.KafkaSecurityError` once the broker has refused its credentials:
    a retry after a failed attempt stops there, rather than at the outage limit."""
    admin.poll(0)
    return admin.list_topics(timeout=timeout_s)


def _outage(what: str, brokers: str, limit_s: float) -> Outage:
    return Outage(f"{what} at {brokers}", limit_s)


def partition_count(brokers: str, topic: str, *, outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S) -> int:
    """How many partitions ``topic`` has; :class:`KafkaAdminError` if it does not exist."""
    topics = _topics(_admin(brokers), _outage("describing topics", brokers, outage_limit_s))
    if topic not in topics:
        raise KafkaAdminError(f"topic {topic!r} does not exist at {brokers}")
    return len(topics[topic].partitions)


def ensure_topics(brokers: str, specs: Iterable[TopicSpec], *, outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S) -> None:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Returns once every topic has a leader for each partition, so a reader
    started next finds them ready. A name given twice with different specs is a
    ``ValueError`` (librdkafka crashes on one request naming a topic twice).
    """
    by_name: dict[str, TopicSpec] = {}
    for spec in specs:
        if by_name.setdefault(spec.name, spec) != spec:
            raise ValueError(f"topic {spec.name!r} is declared twice, differently: {by_name[spec.name]} and {spec}")
    specs = list(by_name.values())
    admin = _admin(brokers)
    outage = _outage("creating topics", brokers, outage_limit_s)
    outage.call(lambda: _create_missing(admin, specs, outage, brokers))
    _wait_ready(admin, [s.name for s in specs], outage, timeout_s=60, brokers=brokers)


def _create_missing(admin: AdminClient, specs: list[TopicSpec], outage: Outage, brokers: str) -> None:
    """One round of creating the topics that are missing; a transient error is raised as librdkafka's
    ``KafkaException``, for :meth:`Outage.call` to retry the round."""
    existing = _topics(admin, outage)
    wanted = [spec.new_topic() for spec in specs if spec.name not in existing]
    for name, future in (admin.create_topics(wanted, operation_timeout=30) if wanted else {}).items():
        try:
            future.result(timeout=60)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() == RdKafkaError.TOPIC_ALREADY_EXISTS:
                continue
            if err.code() in (RdKafkaError.TOPIC_AUTHORIZATION_FAILED, RdKafkaError.CLUSTER_AUTHORIZATION_FAILED):
                raise KafkaAdminError(
                    f"topic {name!r} at {brokers} does not exist or this principal may not see it (no Describe "
                    f"ACL), and it may not create topics ({err.name()}): have an administrator create it "
                    "beforehand, or grant this principal (KAFKA_SASL_USERNAME) Describe on it as "
                    "deploy/kafka/acls.yaml does"
                ) from exc
            if not is_transient(err):
                raise KafkaAdminError(f"cannot create topic {name!r} at {brokers}: {exc}") from exc
            raise


def _wait_ready(admin: AdminClient, names: list[str], outage: Outage, *, timeout_s: float, brokers: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        topics = _topics(admin, outage)
        missing = [n for n in names if n not in topics or any(p.leader < 0 for p in topics[n].partitions.values())]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise KafkaAdminError(f"topics {missing} at {brokers} have no leader after {timeout_s:.0f} s")
        time.sleep(0.1)


def wait_for_topics(
    brokers: str,
    names: Iterable[str],
    *,
    timeout_s: float = 60.0,
    who: str = "the dataflow that creates them",
    outage_limit_s: float = DEFAULT_OUTAGE_LIMIT_S,
) -> None:
    """Wait until the topics exist; a client calls this when it may start before ``who``."""
    names = list(names)
    admin = _admin(brokers)
    outage = _outage("looking up topics", brokers, outage_limit_s)
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        missing = [n for n in names if n not in _topics(admin, outage)]
        if not missing:
            _wait_ready(admin, names, outage, timeout_s=max(1.0, deadline - time.monotonic()), brokers=brokers)
            return
        if time.monotonic() > deadline:
            raise KafkaAdminError(
                f"topics {missing} do not exist at {brokers} after waiting {timeout_s:.0f} s: start {who} first"
            )
        if not told:
            log.warning("waiting up to %.0f s for topics %s at %s (created by %s)", timeout_s, missing, brokers, who)
            told = True
        time.sleep(0.2)


@dataclass(frozen=True)
class TopicInfo:
    """What a producer must know of a topic it did not declare: its partitions, and whether
    it is compacted (a table, where a record under a key replaces the one before)."""

    partitions: int
    compacted: bool


class TopicCache:
    """Partition counts and cleanup policies of topics, from the broker.

    :meth:`describe` answers from the cache, which a background thread
    refreshes every ``refresh_s`` (so a broker outage never blocks a caller on a
    known topic). A topic the cache does not know is asked for at once, at most
    every ``min_miss_refresh_s`` (so a stream of requests naming made-up topics
    cannot flood the broker) and with a short timeout; while the broker is
    down the cache answers with what it last saw. A topic's cleanup policy is
    asked for the first time the topic is described, and refreshed with the
    rest; a topic whose policy the broker did not tell is unknown. Thread-safe.
    """

    def __init__(self, brokers: str, *, refresh_s: float = 10.0, min_miss_refresh_s: float = 1.0) -> None:
        self.brokers = brokers
        self._admin = _admin(brokers)
        self._min_miss_refresh_s = min_miss_refresh_s
        self._partitions: dict[str, int] = {}  # every topic the broker has
        self._known: dict[str, TopicInfo] = {}  # the topics described so far
        self._refreshed = -float("inf")
        self._lock = threading.Lock()
        self._refresh(timeout_s=5)
        # For the life of the process, like the dataflow that asks it.
        threading.Thread(target=self._keep_fresh, args=(refresh_s,), name="topic-cache", daemon=True).start()

    def partitions(self, topic: str) -> int | None:
        """``topic``'s partition count, or ``None`` if it does not exist."""
        info = self.describe(topic)
        return None if info is None else info.partitions

    def describe(self, topic: str) -> TopicInfo | None:
        """``topic``'s partitions and cleanup policy, or ``None`` if it does not exist (or the broker
        has not told its policy yet)."""
        known = self._known.get(topic)
        if known is not None:
            return known
        if topic not in self._partitions and time.monotonic() - self._refreshed >= self._min_miss_refresh_s:
            self._refresh(timeout_s=1)
        if topic in self._partitions:  # a topic that exists, described for the first time
            with self._lock:
                compacted = self._compacted([topic], timeout_s=1)
                if topic in compacted and topic in self._partitions:
                    self._known[topic] = TopicInfo(self._partitions[topic], compacted[topic])
        return self._known.get(topic)

    def _keep_fresh(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            self._refresh(timeout_s=5)

    def _refresh(self, timeout_s: float) -> None:
        with self._lock:
            self._refreshed = time.monotonic()
            try:
                meta = _listed(self._admin, timeout_s)
            except KafkaException as exc:
                log.warning("cannot refresh topic metadata at %s: %s; using what was last seen", self.brokers, exc)
                return
            partitions = {n: len(t.partitions) for n, t in meta.topics.items() if t.error is None and t.partitions}
            described = [n for n in self._known if n in partitions]
            compacted = self._compacted(described, timeout_s)
            # A topic the broker did not answer about keeps the policy last seen.
            self._partitions = partitions
            self._known = {n: TopicInfo(partitions[n], compacted.get(n, self._known[n].compacted)) for n in described}

    def _compacted(self, names: list[str], timeout_s: float) -> dict[str, bool]:
        """Whether each of ``names`` is compacted, for those the broker answers about."""
        if not names:
            return {}
        futures = self._admin.describe_configs([ConfigResource("topic", n) for n in names])
        answers: dict[str, bool] = {}
        for resource, future in futures.items():
            try:
                policy = future.result(timeout=timeout_s)["cleanup.policy"].value or ""
            except (KafkaException, TimeoutError, KeyError) as exc:
                log.warning("cannot describe topic %r at %s: %s", resource.name, self.brokers, exc)
                continue
            answers[resource.name] = "compact" in policy
        return answers
