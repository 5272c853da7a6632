"""The gateway's API keys: 401 without a known key, 403 for a model the key may not use, and the
key itself never in a log or an answer; HTTPS with a certificate and key of its own, in front of the
secured cluster."""

from __future__ import annotations

import logging
import ssl
import subprocess
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from clients.api_keys import ApiKeys
from clients.gateway import Settings
from operators.kafka import TopicSpec, ensure_topics
from patternflow.secrets import REDACTED, public
from tests.support.processes import gateway
from tests.support.secured import CANARY, SecuredBroker, Tenant, as_user

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


def test_tls_settings_that_cannot_serve_stop_the_gateway_naming_them(tmp_path: Path) -> None:
    assert not Settings().tls()  # neither: plain HTTP, for a proxy in front
    with pytest.raises(ValueError, match="GATEWAY_TLS_KEY_FILE is not set"):
        Settings(tls_cert_file=str(tmp_path / "gateway.pem")).tls()
    with pytest.raises(ValueError, match=r"GATEWAY_TLS_CERT_FILE \(.*gateway.pem\) .* No such file"):
        Settings(tls_cert_file=str(tmp_path / "gateway.pem"), tls_key_file=str(tmp_path / "gateway.key")).tls()


def test_the_gateway_serves_https_only_in_front_of_the_secured_cluster(
    secured: SecuredBroker,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, plain_key = secured.certificate  # the test CA's, for 127.0.0.1
    password = f"{CANARY}-gateway-key"
    key = tmp_path / "gateway.key"
    openssl = ["openssl", "pkey", "-in", str(plain_key), "-aes256", "-passout", f"pass:{password}", "-out", str(key)]
    subprocess.run(openssl, check=True, capture_output=True)
    tls = Settings(tls_cert_file=str(cert), tls_key_file=str(key), tls_key_password=password)
    with pytest.raises(ValueError, match="GATEWAY_TLS_KEY_PASSWORD") as caught:  # at once: OpenSSL may not prompt
        replace(tls, tls_key_password="").tls()
    with pytest.raises(ValueError, match="is the key the certificate's"):
        Settings(tls_cert_file=str(secured.ca), tls_key_file=str(plain_key)).tls()
    assert password not in str(caught.value) + repr(tls) and public(tls)["tls_key_password"] == REDACTED

    prefix = tenant.topics.removesuffix(".")  # gateway() names its topics <prefix>.<default>: the matrix's
    as_user(monkeypatch, secured.admin_env())
    ensure_topics(
        secured.address, [TopicSpec(f"{prefix}.inference.requests"), TopicSpec(f"{prefix}.inference.replies")]
    )
    as_user(monkeypatch, secured.env(f"{tenant.users}client"))  # the gateway's Kafka clients: SASL_SSL
    caplog.set_level(logging.DEBUG)
    body = {"inputs": [0.0] * 8, "timeout_ms": 200}
    keys = f"fraud {FRAUD_KEY} tabular-risk"
    with gateway(
        prefix,
        kafka_bootstrap_servers=secured.address,
        api_keys=keys,
        tls_cert_file=tls.tls_cert_file,
        tls_key_file=tls.tls_key_file,
        tls_key_password=tls.tls_key_password,
    ) as base:
        assert base.startswith("https://")
        with httpx.Client(base_url=base, verify=ssl.create_default_context(cafile=secured.ca), timeout=30) as web:
            assert web.get("/healthz").json() == {"status": "ok"}  # its topics, seen as the client principal
            predict = "/v1/models/tabular-risk:predict"
            assert web.post(predict, json=body).status_code == 401
            # Past the key check: no server answers here, so the request times out.
            assert web.post(predict, json=body, headers={"X-API-Key": FRAUD_KEY}).status_code == 504
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{base}/healthz", timeout=10)  # the system's CAs did not sign its certificate
        with pytest.raises(httpx.TransportError):  # no plain HTTP on its port
            httpx.get(f"{base.replace('https://', 'http://')}/healthz", timeout=10)
    key_text = plain_key.read_text() + key.read_text()
    body_lines = [line for line in key_text.splitlines() if line and not line.startswith("-----")]
    assert "serves https://" in caplog.text
    assert CANARY not in caplog.text and not [line for line in body_lines if line in caplog.text]
