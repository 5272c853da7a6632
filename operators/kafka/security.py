"""The client-security profile: how every Kafka client of patternflow authenticates and encrypts.

One profile for every client (dataflow sources, sinks and topic admin, the Python clients, the
gateway, the command line, scripts and benchmarks), read from the same environment variables
everywhere; :func:`security_config` is the one place they become librdkafka settings, and
:func:`~operators.kafka.client.consumer_config`, :func:`~operators.kafka.client.producer_config`
and :func:`~operators.kafka.client.admin_config` all include it.

==========================================  ===============================================
variable                                    librdkafka setting
==========================================  ===============================================
``KAFKA_SECURITY_PROTOCOL``                 ``security.protocol``: PLAINTEXT (default), SSL,
                                            SASL_PLAINTEXT, SASL_SSL
``KAFKA_SASL_MECHANISM``                    ``sasl.mechanism``: PLAIN, SCRAM-SHA-256,
                                            SCRAM-SHA-512, OAUTHBEARER, GSSAPI
``KAFKA_SASL_USERNAME``                     ``sasl.username``
``KAFKA_SASL_PASSWORD`` (secret)            ``sasl.password``
``KAFKA_SASL_OAUTHBEARER_METHOD``           ``sasl.oauthbearer.method`` (``oidc``: librdkafka
                                            fetches tokens itself)
``KAFKA_SASL_OAUTHBEARER_CLIENT_ID``        ``sasl.oauthbearer.client.id``
``KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET``    ``sasl.oauthbearer.client.secret``
(secret)
``KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL``  ``sasl.oauthbearer.token.endpoint.url``
``KAFKA_SASL_OAUTHBEARER_SCOPE``            ``sasl.oauthbearer.scope``
``KAFKA_SSL_CA_LOCATION``                   ``ssl.ca.location``: the CA that signed the
                                            broker's certificate (default: the system's)
``KAFKA_SSL_CERTIFICATE_LOCATION``          ``ssl.certificate.location`` (mutual TLS)
``KAFKA_SSL_KEY_LOCATION``                  ``ssl.key.location``
``KAFKA_SSL_KEY_PASSWORD`` (secret)         ``ssl.key.password``
``KAFKA_CLIENT_PROPERTIES``                 a file of librdkafka ``name=value`` lines for
                                            anything else; the variables above win over it
==========================================  ===============================================

A profile that cannot work (a SASL protocol without a mechanism or password, a file that is not
there) raises :class:`~operators.kafka.errors.KafkaSecurityError` naming the variable before any
connection; credentials or a certificate the broker refuses raise it at the client's next poll
(seconds, not the outage limit). Secrets are never logged: :func:`describe` says who connects how.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError as RdKafkaError

from operators.kafka.errors import KafkaSecurityError
from patternflow.secrets import secret_field

__all__ = ["ClientSecurity", "describe", "security_config"]

log = logging.getLogger("patternflow.kafka")
PROPERTIES_ENV = "KAFKA_CLIENT_PROPERTIES"
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")
_FILES = ("ssl.ca.location", "ssl.certificate.location", "ssl.key.location")


@dataclass(frozen=True)
class ClientSecurity:
    """The profile's variables, each ``KAFKA_<FIELD>``; a field's librdkafka name is its name with dots."""

    security_protocol: str = ""
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = secret_field()
    sasl_oauthbearer_method: str = ""
    sasl_oauthbearer_client_id: str = ""
    sasl_oauthbearer_client_secret: str = secret_field()
    sasl_oauthbearer_token_endpoint_url: str = ""
    sasl_oauthbearer_scope: str = ""
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""
    ssl_key_password: str = secret_field()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        env = os.environ if environ is None else environ
        return cls(**{f.name: env.get(_variable(f.name), "").strip() for f in dataclasses.fields(cls)})

    def config(self, properties: Mapping[str, str] | None = None) -> dict[str, str]:
        """The librdkafka settings: ``properties`` (from :data:`PROPERTIES_ENV`'s file) overridden by
        the variables that are set; :class:`KafkaSecurityError` naming the variable if they cannot work."""
        config = dict(properties or {})
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value:
                config[f.name.replace("_", ".")] = value
        _check(config)
        return config


def _variable(name: str) -> str:
    return "KAFKA_" + name.upper()


def _setting(key: str) -> str:
    """How to name librdkafka setting ``key`` to a user: its variable, or the properties file."""
    name = key.replace(".", "_")
    if name in {f.name for f in dataclasses.fields(ClientSecurity)}:
        return f"{_variable(name)} (or {key} in {PROPERTIES_ENV})"
    return f"{key} in {PROPERTIES_ENV}"


def _check(config: Mapping[str, str]) -> None:
    protocol = config.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in _PROTOCOLS:
        raise KafkaSecurityError(f"{_setting('security.protocol')} is {protocol!r}: expected one of {_PROTOCOLS}")
    if protocol.startswith("SASL"):
        mechanism = config.get("sasl.mechanism", "").upper()
        if mechanism not in _MECHANISMS:
            raise KafkaSecurityError(
                f"{_setting('sasl.mechanism')} is {mechanism!r}, and security protocol {protocol} needs one of "
                f"{_MECHANISMS}"
            )
        needed: tuple[str, ...] = ()
        if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            needed = ("sasl.username", "sasl.password")
        elif mechanism == "OAUTHBEARER" and config.get("sasl.oauthbearer.method", "").lower() == "oidc":
            needed = (
                "sasl.oauthbearer.client.id",
                "sasl.oauthbearer.client.secret",
                "sasl.oauthbearer.token.endpoint.url",
            )
        for key in needed:
            if not config.get(key):
                raise KafkaSecurityError(f"{_setting(key)} is not set, and SASL mechanism {mechanism} needs it")
    for key in _FILES:
        if config.get(key) and not os.access(config[key], os.R_OK):
            raise KafkaSecurityError(f"{_setting(key)} names {config[key]!r}, which is not a readable file")


def _properties(path: str) -> dict[str, str]:
    """A librdkafka properties file: ``name=value`` lines, ``#`` and ``!`` starting comments."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KafkaSecurityError(f"{PROPERTIES_ENV} names {path!r}, which cannot be read: {exc}") from exc
    properties = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#!":
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            # The line itself may hold a secret: say where it is, not what it says.
            raise KafkaSecurityError(f"{PROPERTIES_ENV} ({path}) line {number} is not name=value")
        properties[name.strip()] = value.strip()
    return properties


def _on_error(err: RdKafkaError) -> None:
    """librdkafka's error callback for every client (run at its polls): a refusal of the credentials
    or the certificate raises, naming what to check; anything else is librdkafka's to retry."""
    if err.code() == RdKafkaError._AUTHENTICATION:
        raise KafkaSecurityError(
            f"the broker refused this client's credentials ({err.str()}): check KAFKA_SASL_MECHANISM, "
            "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD (or the OAUTHBEARER settings)"
        )
    if err.code() == RdKafkaError._SSL:
        raise KafkaSecurityError(
            f"TLS with the broker failed ({err.str()}): check KAFKA_SSL_CA_LOCATION (the CA that signed the "
            "broker's certificate) and, for mutual TLS, KAFKA_SSL_CERTIFICATE_LOCATION and KAFKA_SSL_KEY_LOCATION"
        )
    log.info("kafka client: %s", err.str())


def security_config(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The profile's librdkafka settings from the environment (or ``environ``), with the error
    callback that turns a refused credential or certificate into :class:`KafkaSecurityError`."""
    env = os.environ if environ is None else environ
    path = env.get(PROPERTIES_ENV, "").strip()
    config: dict[str, Any] = ClientSecurity.from_env(env).config(_properties(path) if path else None)
    config["error_cb"] = _on_error
    return config


def describe(environ: Mapping[str, str] | None = None) -> str:
    """Who connects how, without secrets: ``SASL_SSL SCRAM-SHA-512 as 'rag'``."""
    config = security_config(environ)
    said = config.get("security.protocol", "PLAINTEXT").upper()
    if said.startswith("SASL"):
        said += f" {config.get('sasl.mechanism', '').upper()}"
        who = config.get("sasl.username") or config.get("sasl.oauthbearer.client.id")
        if who:
            said += f" as {who!r}"
    return said
