"""The fraud dataflow's items: the decision message's format, and items that come back from keyed state."""

from __future__ import annotations

import orjson

from dataflows.fraud_detection.items import Case, Decision, Merchant, decision_message, revived

DECISION = Decision(
    payment_id="p1",
    card="c",
    ts_ms=1767225600000,
    score=0.7,
    river_score=0.7,
    torch_score=0.25,
    decision="block",
    complete={"merchant": True, "card_history": False},
    features={"log_amount": 2.6, "merchant_risk": 0.3},
    latency_ms=12,
)


def test_a_decision_message_is_the_documented_format_in_order() -> None:
    msg = decision_message("payments.decisions", DECISION)
    assert msg.key == b"p1" and msg.topic == "payments.decisions"
    assert msg.value == (
        b'{"payment_id":"p1","card":"c","ts_ms":1767225600000,"score":0.7,"river_score":0.7,"torch_score":0.25,'
        b'"decision":"block","complete":{"merchant":true,"card_history":false},'
        b'"features":{"log_amount":2.6,"merchant_risk":0.3},"latency_ms":12}'
    )


def test_items_stored_in_keyed_state_as_json_are_revived() -> None:
    case = Case("p1", "c", 1, 2, {"amount_z": 0.5}, {"merchant": False, "card_history": True})
    for item in (DECISION, case, Merchant("grocery", 0.1)):
        assert revived(type(item), orjson.loads(orjson.dumps(item))) == item
        assert revived(type(item), item) is item
    assert revived(Case, None) is None
