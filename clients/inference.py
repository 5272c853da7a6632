"""Python clients for the online-inference dataflow, over Kafka request/reply.

:class:`InferenceClient` (thread-safe, blocking) and :class:`AsyncInferenceClient`
(asyncio) send a request with a fresh correlation id and a deadline, and wait
for the reply on their own reply partition. Each instance reads one partition
of the reply topic from its end at start; replies for ids it is not waiting for
(other clients on the same partition, late or duplicate replies) are ignored. A
caller always gets a reply or :class:`InferenceTimeout` by its own clock. A
client started before the server waits for the server's topics (up to
``wait_for_server_s``, then :class:`~operators.kafka.KafkaAdminError`); a
broker restart delays replies but loses no request (librdkafka retries them).

    with InferenceClient("127.0.0.1:9092") as client:
        reply = client.predict("tabular-risk", [0.2, 1.0, 0.0, 0.5, 0.0, 1.2, 0.0, 1.0])
        reply["status"], reply.get("outputs")
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from operators.kafka import Outage, consumer_config, partition_count, producer_config, wait_for_topics
from operators.protocol import RAG_QUERIES_TOPIC, REPLY_TOPIC, REQUEST_TOPIC, request_headers
from patternflow.errors import PatternflowError

__all__ = ["AsyncInferenceClient", "InferenceClient", "InferenceTimeout"]


class InferenceTimeout(PatternflowError, TimeoutError):
    """No reply came within the caller's timeout (or the server was given up on while waiting)."""


class InferenceClient:
    def __init__(
        self,
        brokers: str,
        *,
        request_topic: str = REQUEST_TOPIC,
        reply_topic: str = REPLY_TOPIC,
        reply_partition: int | None = None,
        timeout_s: float = 1.0,
        wait_for_server_s: float = 120.0,
    ) -> None:
        self.request_topic = request_topic
        self.reply_topic = reply_topic
        self.timeout_s = timeout_s
        # The server creates the topics: a client started first waits for them.
        server = "dataflows.rag" if request_topic == RAG_QUERIES_TOPIC else "dataflows.online_inference"
        wait_for_topics(brokers, [request_topic, reply_topic], timeout_s=wait_for_server_s, who=server)
        if reply_partition is None:
            reply_partition = random.randrange(partition_count(brokers, reply_topic))
        self.reply_partition = reply_partition
        self._producer = Producer(producer_config(brokers, {"linger.ms": 0}))
        self._consumer = Consumer(consumer_config(brokers, {"fetch.wait.max.ms": 5}))
        tp = TopicPartition(reply_topic, reply_partition)
        outage = Outage(f"positioning on {reply_topic}[{reply_partition}] at {brokers}")
        _, end = outage.call(lambda: self._consumer.get_watermark_offsets(tp, timeout=5))
        # Positioned before the first request goes out, so no reply can slip past.
        self._consumer.assign([TopicPartition(reply_topic, reply_partition, end)])
        self._waiting: dict[str, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name="inference-replies", daemon=True)
        self._receiver.start()

    def submit(self, model: str, inputs: Any, *, timeout_s: float | None = None) -> tuple[str, Future[dict[str, Any]]]:
        """Send a request; return its correlation id and a future for its reply."""
        correlation_id = uuid.uuid4().hex
        deadline_ms = int((time.time() + (timeout_s or self.timeout_s)) * 1000)
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._waiting[correlation_id] = future
        headers = request_headers(correlation_id, self.reply_topic, self.reply_partition, deadline_ms)
        value = orjson.dumps({"model": model, "inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)
        while True:
            try:
                self._producer.produce(self.request_topic, value, key=correlation_id.encode(), headers=headers)
                break
            except BufferError:  # the local queue is full (e.g. while the broker restarts): wait for room
                self._producer.poll(0.05)
        self._producer.poll(0)
        return correlation_id, future

    def forget(self, correlation_id: str) -> None:
        """Stop waiting for a reply (after a timeout): if it comes, it is ignored."""
        with self._lock:
            self._waiting.pop(correlation_id, None)

    def predict(self, model: str, inputs: Any, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The reply (``status`` is ok, error, timeout or rejected), or :class:`InferenceTimeout`."""
        timeout = timeout_s or self.timeout_s
        correlation_id, future = self.submit(model, inputs, timeout_s=timeout)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            self.forget(correlation_id)
            raise InferenceTimeout(f"no reply to {correlation_id} within {timeout} s") from None

    def wait_until_serving(
        self, model: str, inputs: Any, *, timeout_s: float = 120.0, give_up: Callable[[], str | None] = lambda: None
    ) -> dict[str, Any]:
        """Send a request until one is answered, and return that reply: for a caller
        that starts a server and must know when it serves (one that reads from the
        end only once its models are loaded leaves earlier requests unread).
        ``give_up`` may return a reason to stop waiting (the server exited, say)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reason = give_up()
            if reason:
                raise InferenceTimeout(f"stopped waiting for the server: {reason}")
            try:
                return self.predict(model, inputs, timeout_s=min(2.0, self.timeout_s))
            except InferenceTimeout:
                pass
        raise InferenceTimeout(f"no server answered {model!r} requests on {self.request_topic} within {timeout_s} s")

    def _receive(self) -> None:
        while not self._closed.is_set():
            # poll() returns at the first message; consume(n, t) would wait for n or t.
            first = self._consumer.poll(0.05)
            if first is None:
                continue
            for msg in (first, *self._consumer.consume(500, 0)):
                key, value = msg.key(), msg.value()
                if msg.error() is not None or key is None or value is None:
                    continue
                with self._lock:
                    future = self._waiting.pop(key.decode(), None)
                if future is not None:
                    future.set_result(orjson.loads(value))

    def close(self) -> None:
        self._closed.set()
        self._receiver.join(timeout=5)
        self._consumer.close()
        self._producer.flush(5)

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncInferenceClient:
    """The same protocol for asyncio: ``await client.predict(model, inputs)``."""

    def __init__(self, brokers: str, **kwargs: Any) -> None:
        self._client = InferenceClient(brokers, **kwargs)

    @property
    def timeout_s(self) -> float:
        return self._client.timeout_s

    async def predict(self, model: str, inputs: Any, *, timeout_s: float | None = None) -> dict[str, Any]:
        timeout = timeout_s or self._client.timeout_s
        correlation_id, future = self._client.submit(model, inputs, timeout_s=timeout)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            self._client.forget(correlation_id)
            raise InferenceTimeout(f"no reply to {correlation_id} within {timeout} s") from None

    async def wait_until_serving(self, model: str, inputs: Any, **kwargs: Any) -> dict[str, Any]:
        """See :meth:`InferenceClient.wait_until_serving`."""
        return await asyncio.to_thread(self._client.wait_until_serving, model, inputs, **kwargs)

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
