"""Seeded card-payment traffic for the fraud-detection dataflow: demo, tests and benchmark.

:func:`generate` returns payments, the chargebacks (labels) that some of them
get later, and the merchant table with its updates, all in event time:

- cards with a home country and a typical spend; merchants skewed (Zipf) in
  popularity, each with a category and a risk level;
- payments arrive at an average interval, in bursts;
- fraud before the drift point: stolen cards spend fast and big, abroad, at
  risky merchants; after it (concept drift): a fraud ring tests many cards with
  small payments at home, at a few merchants that look harmless, until a
  merchant update marks them risky a while later;
- a fraudulent payment gets a chargeback with probability ``label_rate``,
  ``label_delay_ms`` later (uniform in the range); legitimate ones never do.

    python -m scripts.fraud_traffic --payments 100000    # what a run generates, in numbers
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from operators.kafka import KafkaMessage, produce

__all__ = [
    "START_MS",
    "Traffic",
    "event_messages",
    "generate",
    "paced",
    "replay",
    "table_messages",
    "warm_up",
]

START_MS = 1_767_225_600_000  # 2026-01-01T00:00Z
COUNTRIES = ["US", "GB", "DE", "FR", "BR", "IN", "NG", "RU"]
CATEGORIES = {"grocery": 0.1, "fuel": 0.2, "travel": 0.5, "electronics": 0.8, "gift_cards": 0.9}


@dataclass(frozen=True)
class Traffic:
    payments: list[dict[str, Any]]
    chargebacks: list[dict[str, Any]]
    merchants: list[dict[str, Any]]  # table rows in event-time order; later rows update earlier ones
    drift_ms: int  # when the fraud pattern changes

    @property
    def frauds(self) -> set[str]:
        return {p["payment_id"] for p in self.payments if p["fraud"]}


def generate(
    n_payments: int,
    *,
    seed: int = 7,
    cards: int = 2_000,
    merchants: int = 200,
    interval_ms: int = 2_000,
    drift_at: float = 0.5,
    label_rate: float = 0.9,
    label_delay_ms: tuple[int, int] = (60_000, 600_000),
    start_ms: int = START_MS,
) -> Traffic:
    rng = random.Random(seed)
    homes = [rng.choice(COUNTRIES[:4]) for _ in range(cards)]
    spend = [math.exp(rng.gauss(3.2, 0.6)) for _ in range(cards)]
    categories = list(CATEGORIES)
    table = [
        {"merchant": f"m{i:04d}", "category": (c := rng.choice(categories)), "risk": CATEGORIES[c], "ts_ms": start_ms}
        for i in range(merchants)
    ]
    risky = [str(m["merchant"]) for m in table if CATEGORIES[str(m["category"])] >= 0.8]
    weights = [1 / (i + 1) for i in range(merchants)]  # Zipf: a few merchants take most payments
    ring_merchants = [f"m{i:04d}" for i in range(merchants - 3, merchants)]
    drift_ms = start_ms + int(n_payments * drift_at) * interval_ms
    updates = [
        {"merchant": m, "category": "gift_cards", "risk": 0.95, "ts_ms": drift_ms + 3_600_000} for m in ring_merchants
    ]
    payments: list[dict[str, Any]] = []
    chargebacks: list[dict[str, Any]] = []
    ts = start_ms
    stolen: list[tuple[int, int]] = []  # (card, payments left in its burst)
    while len(payments) < n_payments:
        ts += int(rng.expovariate(1 / interval_ms)) if rng.random() > 0.2 else rng.randrange(5)  # bursts
        card = rng.randrange(cards)
        fraud = False
        if ts < drift_ms:
            if stolen and rng.random() < 0.5:
                card, left = stolen.pop()
                if left > 1:
                    stolen.append((card, left - 1))
                fraud = True
            elif rng.random() < 0.004:
                stolen.append((card, rng.randrange(3, 9)))
            merchant = rng.choices(table, weights)[0]["merchant"]
            if fraud:
                merchant = rng.choice(risky)
                amount, country = spend[card] * rng.uniform(4, 12), rng.choice(COUNTRIES[4:])
            else:
                amount, country = spend[card] * math.exp(rng.gauss(0, 0.4)), homes[card]
        else:
            fraud = rng.random() < 0.03
            if fraud:  # card testing: small amounts at home, at the ring's merchants
                merchant, amount, country = rng.choice(ring_merchants), rng.uniform(0.5, 3.0), homes[card]
            else:
                merchant = rng.choices(table, weights)[0]["merchant"]
                amount, country = spend[card] * math.exp(rng.gauss(0, 0.4)), homes[card]
        payment_id = f"p{len(payments):08d}"
        payments.append(
            {
                "payment_id": payment_id,
                "card": f"card-{card:05d}",
                "card_country": homes[card],
                "merchant": merchant,
                "amount": round(amount, 2),
                "country": country,
                "card_present": (not fraud) and rng.random() < 0.6,
                "ts_ms": ts,
                "fraud": fraud,  # ground truth, for evaluation; the dataflow never reads it
            }
        )
        if fraud and rng.random() < label_rate:
            chargebacks.append({"payment_id": payment_id, "ts_ms": ts + rng.randint(*label_delay_ms)})
    chargebacks.sort(key=lambda c: c["ts_ms"])
    return Traffic(payments, chargebacks, table + updates, drift_ms)


def event_messages(traffic: Traffic, *, payments: str, chargebacks: str) -> list[tuple[int, KafkaMessage]]:
    """Payments (keyed by card) and chargebacks (keyed by payment id) merged in event-time order,
    each with its event time."""
    events = [
        (p["ts_ms"], KafkaMessage(orjson.dumps(p), key=p["card"].encode(), topic=payments)) for p in traffic.payments
    ]
    events += [
        (c["ts_ms"], KafkaMessage(orjson.dumps(c), key=c["payment_id"].encode(), topic=chargebacks))
        for c in traffic.chargebacks
    ]
    events.sort(key=lambda e: e[0])
    return events


def table_messages(traffic: Traffic, topic: str) -> list[KafkaMessage]:
    """The merchant table's rows (keyed by merchant), in order: produce them before the payments."""
    return [KafkaMessage(orjson.dumps(m), key=m["merchant"].encode(), topic=topic) for m in traffic.merchants]


def warm_up(n: int = 20) -> Traffic:
    """``n`` payments (ids ``warm-...``, no chargebacks) a day before :func:`generate`'s: a dataflow's
    first decisions, to wait for before measuring it. Their merchants are in every generated table."""
    payments = generate(n, seed=1, start_ms=START_MS - 86_400_000).payments
    return Traffic([{**p, "payment_id": f"warm-{p['payment_id']}"} for p in payments], [], [], 0)


def replay(brokers: str, traffic: Traffic, *, payments: str, chargebacks: str, seconds: float) -> None:
    """Produce payments and chargebacks in event-time order, each at its event time compressed
    into ``seconds``: arrivals follow event time, bursts included, as live traffic does."""
    produce(brokers, paced(event_messages(traffic, payments=payments, chargebacks=chargebacks), seconds))


def paced(events: list[tuple[int, KafkaMessage]], seconds: float) -> Iterator[KafkaMessage]:
    """The messages, each yielded at its event time compressed into ``seconds`` from the first."""
    first, span = events[0][0], max(1, events[-1][0] - events[0][0])
    start = time.monotonic()
    for ts, msg in events:
        delay = start + (ts - first) / span * seconds - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield msg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--payments", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    traffic = generate(args.payments, seed=args.seed)
    print(
        f"{len(traffic.payments):,} payments ({len(traffic.frauds):,} fraudulent), "
        f"{len(traffic.chargebacks):,} chargebacks, {len(traffic.merchants):,} merchant rows"
    )


if __name__ == "__main__":
    main()
