"""The gateway's API keys: 401 without a known key, 403 for a model the key may not use, and the
key itself never in a log or an answer."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from clients.api_keys import ApiKeys
from clients.gateway import Settings
from operators.kafka import TopicSpec, ensure_topics
from tests.support.processes import gateway

FRAUD_KEY = "k-fraud-0123456789abcdef"
SEARCH_KEY = "k-search-0123456789abcdef"


def test_a_keys_file_names_a_bad_line_without_its_text() -> None:
    with pytest.raises(ValueError, match="line 2") as caught:
        ApiKeys.parse(["fraud k-0123456789abcdef tabular-risk", f"oops {FRAUD_KEY}"], "keys.txt")
    assert FRAUD_KEY not in str(caught.value)
    assert ApiKeys.parse(["# no keys"], "keys.txt").check({}, "tabular-risk") is None  # none: open


def test_the_gateway_asks_for_a_key_and_allows_each_key_its_models(
    brokers: str, topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"fraud {FRAUD_KEY} tabular-risk\n# the search team\nsearch {SEARCH_KEY} rag,minilm-embeddings\n")
    requests, replies = f"{topic}.inference.requests", f"{topic}.inference.replies"  # as gateway() names them
    ensure_topics(brokers, [TopicSpec(requests), TopicSpec(replies)])
    caplog.set_level(logging.DEBUG)
    body = {"inputs": [0.0] * 8, "timeout_ms": 200}
    with (
        gateway(topic, kafka_bootstrap_servers=brokers, api_keys_file=str(keys)) as base,
        httpx.Client(base_url=base, timeout=30) as web,
    ):
        predict = "/v1/models/tabular-risk:predict"
        assert web.post(predict, json=body).status_code == 401
        unknown = web.post(predict, json=body, headers={"Authorization": "Bearer k-nobody-0123456789abcdef"})
        assert unknown.status_code == 401 and unknown.headers["www-authenticate"] == "Bearer"
        forbidden = web.post(predict, json=body, headers={"Authorization": f"Bearer {SEARCH_KEY}"})
        assert forbidden.status_code == 403 and "'search' may not use model 'tabular-risk'" in forbidden.text
        # Past the key check: no server answers here, so the request times out.
        assert web.post(predict, json=body, headers={"Authorization": f"Bearer {FRAUD_KEY}"}).status_code == 504
        assert web.post(predict, json=body, headers={"X-API-Key": FRAUD_KEY}).status_code == 504
        assert web.get("/v1/jobs/j1").status_code == 401
        assert web.get("/v1/jobs/j1", headers={"X-API-Key": SEARCH_KEY}).status_code == 503  # no job workers
        assert web.get("/healthz").status_code in (200, 503)  # no key needed
    said = caplog.text + str(Settings(api_keys=f"fraud {FRAUD_KEY} *"))
    assert "fraud, search" in caplog.text and FRAUD_KEY not in said and SEARCH_KEY not in said
