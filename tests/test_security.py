"""The client-security profile without a broker: variables to librdkafka settings, checks that
name the variable, the properties file, and no secret in what it says."""

from __future__ import annotations

from pathlib import Path

import pytest

from operators.kafka import KafkaSecurityError, admin_config, consumer_config, producer_config
from operators.kafka.security import describe, security_config

CANARY = "canary-Pw-51c0e2"
SCRAM = {
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
    "KAFKA_SASL_USERNAME": "rag",
    "KAFKA_SASL_PASSWORD": CANARY,
}


def test_the_variables_become_librdkafka_settings_for_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SCRAM.items():
        monkeypatch.setenv(name, value)
    wanted = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.password": CANARY}
    for config in (consumer_config("h:1"), producer_config("h:1"), admin_config("h:1")):
        assert wanted.items() <= config.items() and config["sasl.username"] == "rag"
    assert describe() == "SASL_SSL SCRAM-SHA-512 as 'rag'"


def test_the_plain_broker_needs_no_setting() -> None:
    config = security_config({})
    assert set(config) == {"error_cb"} and describe({}) == "PLAINTEXT"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM"),
        ({**SCRAM, "KAFKA_SASL_MECHANISM": "SCRAM"}, "KAFKA_SASL_MECHANISM"),
        ({**SCRAM, "KAFKA_SASL_PASSWORD": ""}, "KAFKA_SASL_PASSWORD"),
        ({**SCRAM, "KAFKA_SASL_USERNAME": ""}, "KAFKA_SASL_USERNAME"),
        ({**SCRAM, "KAFKA_SSL_CA_LOCATION": "/nowhere/ca.pem"}, "KAFKA_SSL_CA_LOCATION"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "OAUTHBEARER"}
            | {"KAFKA_SASL_OAUTHBEARER_METHOD": "oidc", "KAFKA_SASL_OAUTHBEARER_CLIENT_ID": "rag"},
            "KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET",
        ),
        ({"KAFKA_CLIENT_PROPERTIES": "/nowhere/client.properties"}, "KAFKA_CLIENT_PROPERTIES"),
    ],
)
def test_a_profile_that_cannot_work_fails_before_connecting_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(KafkaSecurityError, match=named) as caught:
        security_config(env)
    assert CANARY not in str(caught.value)


def test_a_properties_file_gives_the_rest_and_the_variables_win(tmp_path: Path) -> None:
    props = tmp_path / "client.properties"
    props.write_text(f"# from the platform team\nsasl.password={CANARY}\nclient.id = pf\nsasl.username=old\n")
    config = security_config({**SCRAM, "KAFKA_SASL_PASSWORD": "", "KAFKA_CLIENT_PROPERTIES": str(props)})
    assert (config["sasl.password"], config["client.id"], config["sasl.username"]) == (CANARY, "pf", "rag")
    props.write_text(f"sasl.password {CANARY}\n")
    with pytest.raises(KafkaSecurityError, match="line 1 is not name=value") as caught:
        security_config({"KAFKA_CLIENT_PROPERTIES": str(props)})
    assert CANARY not in str(caught.value)
