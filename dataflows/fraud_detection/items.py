"""What flows through the fraud dataflow, with the decoders and encoders of its messages.

The items are frozen dataclasses whose fields, in order, are their JSON documents: orjson
writes a dataclass's fields in order, so a :class:`Decision` encoded is the decision message
(and a :class:`Payment`, the late-payment message). Keyed state keeps values as JSON
(:mod:`state.store`), so an item that waited in a join comes back as its document;
:func:`revived` makes it the item again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson

from operators.dlq import decode_json
from operators.kafka import KafkaMessage
from operators.windowing import Late
from patternflow import InvalidMessage

__all__ = [
    "Case",
    "Chargeback",
    "Decision",
    "Merchant",
    "Outcome",
    "Payment",
    "decision_message",
    "late_message",
    "merchant_row",
    "outcome_message",
    "parse_chargeback",
    "parse_merchant",
    "parse_payment",
    "revived",
]

T = TypeVar("T")
_decode = decode_json()


@dataclass(frozen=True)
class Payment:
    payment_id: str
    card: str
    card_country: str
    merchant: str
    country: str
    amount: float
    card_present: bool
    ts_ms: int
    produced_ms: int  # when it was produced to Kafka: a decision's latency counts from it
    partition: int  # of the payments topic: the watermark keeps a clock per partition


@dataclass(frozen=True)
class Chargeback:
    payment_id: str
    ts_ms: int


@dataclass(frozen=True)
class Merchant:
    """A merchant's row of the merchants table."""

    category: str
    risk: float


@dataclass(frozen=True)
class Case:
    """A payment as the models see it: its features ``x``, and which of them were ``complete``
    (``{"merchant": bool, "card_history": bool}``)."""

    payment_id: str
    card: str
    ts_ms: int
    produced_ms: int
    x: dict[str, float]
    complete: dict[str, bool]


@dataclass(frozen=True)
class Decision:
    """The decision message on ``payments.decisions``, field by field; ``score`` is the river score."""

    payment_id: str
    card: str
    ts_ms: int
    score: float
    river_score: float
    torch_score: float
    decision: Literal["block", "allow"]
    complete: dict[str, bool]
    features: dict[str, float]
    latency_ms: int


@dataclass(frozen=True)
class Outcome:
    """A decision with its label (1: a chargeback came within the label window), on ``payments.outcomes``."""

    payment_id: str
    score: float
    label: int


def revived(cls: type[T], value: T | dict[str, Any] | None) -> T | None:
    """``value`` as a ``cls``: an item that waited in keyed state comes back as its JSON document."""
    return cls(**value) if isinstance(value, dict) else value


def _object(msg: KafkaMessage) -> dict[str, Any]:
    doc = _decode(msg)
    if not isinstance(doc, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= 64:
        raise InvalidMessage(f"{name} must be a string of 1 to 64 characters, got {value!r:.80}")
    return value


def _time(doc: dict[str, Any], now_ms: int, max_future_ms: int) -> int:
    ts = doc.get("ts_ms")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts <= now_ms + max_future_ms:
        raise InvalidMessage(
            f"ts_ms must be epoch ms, not before 1970 or more than {max_future_ms} ms ahead: {ts!r:.80}"
        )
    return ts


def parse_payment(msg: KafkaMessage, now_ms: int, max_future_ms: int) -> Payment:
    doc = _object(msg)
    amount = doc.get("amount")
    if not isinstance(amount, int | float) or isinstance(amount, bool) or not 0 < amount < 1e9:
        raise InvalidMessage(f"amount must be a number above 0, got {amount!r:.80}")
    if not isinstance(doc.get("card_present"), bool):
        raise InvalidMessage(f"card_present must be true or false, got {doc.get('card_present')!r:.80}")
    return Payment(
        payment_id=_text(doc, "payment_id"),
        card=_text(doc, "card"),
        card_country=_text(doc, "card_country"),
        merchant=_text(doc, "merchant"),
        country=_text(doc, "country"),
        amount=float(amount),
        card_present=doc["card_present"],
        ts_ms=_time(doc, now_ms, max_future_ms),
        produced_ms=msg.timestamp_ms or now_ms,
        partition=msg.partition or 0,
    )


def parse_chargeback(msg: KafkaMessage, now_ms: int, max_future_ms: int) -> Chargeback:
    doc = _object(msg)
    return Chargeback(_text(doc, "payment_id"), _time(doc, now_ms, max_future_ms))


def merchant_row(doc: dict[str, Any]) -> Merchant:
    """The row of a merchants-topic document ``{"merchant", "category", "risk"}``."""
    risk = doc.get("risk")
    if not isinstance(risk, int | float) or isinstance(risk, bool) or not 0 <= risk <= 1:
        raise InvalidMessage(f"risk must be a number from 0 to 1, got {risk!r:.80}")
    return Merchant(str(doc.get("category", "")), float(risk))


def parse_merchant(msg: KafkaMessage) -> tuple[str, Merchant | None]:
    """``(merchant, row)``; a tombstone (null value) deletes the merchant."""
    if msg.value is None:
        if not msg.key:
            raise InvalidMessage("a merchant tombstone must be keyed by the merchant")
        return msg.key.decode(errors="replace"), None
    doc = _object(msg)
    row = merchant_row(doc)
    return _text(doc, "merchant"), row


def decision_message(topic: str, decision: Decision) -> KafkaMessage:
    return KafkaMessage(orjson.dumps(decision), key=decision.payment_id.encode(), topic=topic)


def outcome_message(topic: str, outcome: Outcome) -> KafkaMessage:
    return KafkaMessage(orjson.dumps(outcome), key=outcome.payment_id.encode(), topic=topic)


def late_message(topic: str, late: Late[Payment]) -> KafkaMessage:
    """The payment as it was read (with ``produced_ms`` and ``partition``), keyed by its card."""
    return KafkaMessage(orjson.dumps(late.value), key=late.key.encode(), topic=topic)
