"""The online-inference request/reply protocol, shared by the server and its
clients (no Bytewax here, so clients can import it), and the async jobs' and RAG's topics.

A request is a message on :data:`REQUEST_TOPIC` whose value is
``{"model": "<name>", "inputs": <one instance>}`` and whose headers are:

==================  ========  ==========================================================
header              required  form
==================  ========  ==========================================================
``correlation_id``  yes       UTF-8, 1 to 256 bytes; the reply's key
``reply_topic``     yes       an existing topic the server's reply rule allows (below)
``reply_partition`` no        a partition number of ``reply_topic`` (ASCII digits)
``deadline_ms``     no        epoch milliseconds (ASCII digits)
==================  ========  ==========================================================

When a header is given twice, the last value counts. A request whose reply
destination (the first three) is missing or invalid cannot be answered and
goes to the dead-letter topic only; any other fault gets an ``error`` reply
and a dead letter.

A reply destination is named by whoever sends a request, so a server answers only
where its reply rule (:class:`ReplyRules`, the ``<PREFIX>REPLY_TOPICS`` setting of
every dataflow that replies) allows: its own reply topic, and topics matching one
of the rule's names or shell-style patterns (by default :data:`DEFAULT_REPLY_TOPICS`:
names ending in ``.replies`` or ``.answers``). Whatever the rule says, a reply
never goes to one of the server's own topics (what it reads, its dead letters),
to any dead-letter topic (``*.dlq``), or to a compacted topic: a compacted topic
is a table (documents, merchants, job results), and a reply keyed by a
correlation id the sender chose would replace the record under that key.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

from operators.kafka.admin import TopicInfo, valid_topic_name
from operators.kafka.message import KafkaMessage
from patternflow import InvalidMessage

__all__ = [
    "DEFAULT_REPLY_TOPICS",
    "JOBS_RESULTS_TOPIC",
    "JOBS_SUBMIT_TOPIC",
    "MAX_CORRELATION_ID_BYTES",
    "MAX_JOB_ID_BYTES",
    "RAG_ANSWERS_TOPIC",
    "RAG_EVALS_TOPIC",
    "RAG_MODEL",
    "RAG_QUERIES_TOPIC",
    "REPLY_TOPIC",
    "REQUEST_TOPIC",
    "ReplyRules",
    "ReplyTo",
    "deadline_ms",
    "id_from_key",
    "reply_to",
    "request_headers",
]

REQUEST_TOPIC = "inference.requests"
REPLY_TOPIC = "inference.replies"
# Async jobs (the protocol is in dataflows.async_jobs.jobs): submissions in, every status out.
JOBS_SUBMIT_TOPIC = "jobs.submit"
JOBS_RESULTS_TOPIC = "jobs.results"
MAX_JOB_ID_BYTES = 256  # job ids, task ids and document ids: the message key
# RAG (the query format is in dataflows.rag.steps): queries in, answers out, over this protocol.
RAG_MODEL = "rag"
RAG_QUERIES_TOPIC = "rag.queries"
RAG_ANSWERS_TOPIC = "rag.answers"
RAG_EVALS_TOPIC = "rag.evals"
MAX_CORRELATION_ID_BYTES = 256
# Where a server may reply besides its own reply topic, unless its <PREFIX>REPLY_TOPICS says otherwise.
DEFAULT_REPLY_TOPICS = ("*.replies", "*.answers")
_DLQ_PATTERN = "*.dlq"  # operators.dlq.DLQ_SUFFIX; dead letters are never a reply destination
_DIGITS = re.compile(rb"[0-9]{1,18}")


@dataclass(frozen=True)
class ReplyTo:
    """Where a request's reply goes."""

    correlation_id: str
    topic: str
    partition: int | None


@dataclass(frozen=True)
class ReplyRules:
    """Where a server may reply. ``describe`` tells a topic's partitions and cleanup policy
    (``None``: no such topic), e.g. :meth:`TopicCache.describe <operators.kafka.admin.TopicCache.describe>`;
    ``allowed`` holds names and shell-style patterns (``*.replies``), ``own`` the server's own topics,
    which never take replies; ``setting`` is the variable that sets ``allowed``, named in reasons."""

    describe: Callable[[str], TopicInfo | None]
    allowed: tuple[str, ...]
    own: frozenset[str] = frozenset()
    setting: str = "the reply rule"

    def check(self, topic: str) -> int:
        """``topic``'s partition count if a reply may go there; :class:`InvalidMessage` saying why not."""
        if not valid_topic_name(topic):
            raise InvalidMessage(f"reply_topic {topic!r:.300} is not a valid Kafka topic name")
        if topic in self.own:
            raise InvalidMessage(f"reply_topic {topic!r} is one of the server's own topics {sorted(self.own)}")
        if fnmatch.fnmatchcase(topic, _DLQ_PATTERN):
            raise InvalidMessage(f"reply_topic {topic!r} is a dead-letter topic")
        if not any(fnmatch.fnmatchcase(topic, allowed) for allowed in self.allowed):
            raise InvalidMessage(f"reply_topic {topic!r} is not allowed by {self.setting} {list(self.allowed)}")
        info = self.describe(topic)
        if info is None:
            # (or the server may not read its configuration: it needs DescribeConfigs on its reply topics)
            raise InvalidMessage(f"reply_topic {topic!r} does not exist, or its cleanup policy cannot be read")
        if info.compacted:
            raise InvalidMessage(f"reply_topic {topic!r} is compacted: a reply there would replace a record")
        return info.partitions


def request_headers(
    correlation_id: str, reply_topic: str, reply_partition: int | None = None, deadline_ms: int | None = None
) -> list[tuple[str, str | bytes | None]]:
    """The headers of a request, as a client sends them."""
    headers: list[tuple[str, str | bytes | None]] = [
        ("correlation_id", correlation_id.encode()),
        ("reply_topic", reply_topic.encode()),
    ]
    if reply_partition is not None:
        headers.append(("reply_partition", str(reply_partition).encode()))
    if deadline_ms is not None:
        headers.append(("deadline_ms", str(deadline_ms).encode()))
    return headers


def _number(msg: KafkaMessage, name: str) -> int | None:
    raw = msg.header(name)
    if raw is None:
        return None
    if not _DIGITS.fullmatch(raw):
        raise InvalidMessage(f"header {name!r} must be a non-negative integer in ASCII digits, got {raw!r:.60}")
    return int(raw)


def _text(msg: KafkaMessage, name: str) -> str:
    raw = msg.header(name)
    if not raw:
        raise InvalidMessage(f"request lacks the {name} header: nowhere to reply")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidMessage(f"header {name!r} is not UTF-8: {raw!r:.60}") from None


def reply_to(msg: KafkaMessage, rules: ReplyRules) -> ReplyTo:
    """Where ``msg`` asks to be answered, checked against ``rules``;
    :class:`InvalidMessage` if it cannot be answered there."""
    correlation_id = _text(msg, "correlation_id")
    if len(correlation_id.encode()) > MAX_CORRELATION_ID_BYTES:
        raise InvalidMessage(f"header 'correlation_id' is over {MAX_CORRELATION_ID_BYTES} bytes")
    topic = _text(msg, "reply_topic")
    count = rules.check(topic)
    partition = _number(msg, "reply_partition")
    if partition is not None and partition >= count:
        raise InvalidMessage(f"reply_partition {partition} does not exist: {topic!r} has {count} partition(s)")
    return ReplyTo(correlation_id, topic, partition)


def deadline_ms(msg: KafkaMessage) -> int | None:
    """The request's ``deadline_ms`` header; :class:`InvalidMessage` if malformed."""
    return _number(msg, "deadline_ms")


def id_from_key(key: bytes | None, what: str, subject: str) -> str:
    """The message key as ``what`` (a job id, a task id, a document id): UTF-8, 1 to
    :data:`MAX_JOB_ID_BYTES` bytes; :class:`InvalidMessage` naming ``subject`` otherwise."""
    if not key:
        raise InvalidMessage(f"{subject} must be keyed by its {what}")
    if len(key) > MAX_JOB_ID_BYTES:
        raise InvalidMessage(f"{what} is {len(key)} bytes, over {MAX_JOB_ID_BYTES}")
    try:
        return key.decode()
    except UnicodeDecodeError:
        raise InvalidMessage(f"{what} (the message key) is not UTF-8") from None
