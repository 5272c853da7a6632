"""The secured tier's broker: SASL_SSL with SCRAM-SHA-512 over a test CA, the KRaft StandardAuthorizer,
a principal per dataflow and client with the ACLs it is granted; the ``secured`` fixture.

Every principal's password starts with :data:`CANARY`, so a test can grep what a dataflow wrote
(logs, metrics, manifests) for it. Tests that use the fixture are marked ``secured``.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
from confluent_kafka.admin import (
    AdminClient,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from operators.kafka.security import security_config
from patternflow import free_port
from scripts.kafka_acls import Grant, apply, grants, load
from tests.support.kafka import Broker

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["CANARY", "SecuredBroker", "Tenant", "as_user", "deployed", "secured", "tenant"]

CANARY = "canary-7d1e5b"
S = TypeVar("S", bound="DataclassInstance")


def deployed(settings: type[S], prefix: str) -> S:
    """A dataflow's ``settings`` with each of its topics (the fields named ``*_topic``) named as the ACL
    matrix names it, its default, under ``prefix``."""
    return settings(**{f.name: f"{prefix}{f.default}" for f in fields(settings) if f.name.endswith("_topic")})


class SecuredBroker:
    """A secured broker of the tier's own, and the principals made on it."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "secrets"
        self.broker = Broker(free_port(block=2), root / "data", secured=self.dir)
        self.address = self.broker.address
        self.passwords: dict[str, str] = {}
        self._admin: AdminClient | None = None

    @property
    def ca(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def certificate(self) -> tuple[Path, Path]:
        """A certificate the test CA signed for 127.0.0.1 and localhost (the broker's), and its key
        (PEM, unencrypted): what a test serves TLS with."""
        return self.dir / "broker.pem", self.dir / "broker.key"

    def env(self, user: str, password: str | None = None) -> dict[str, str]:
        """The client-security profile of ``user`` (the variables every client reads)."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.address,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": user,
            "KAFKA_SASL_PASSWORD": self.passwords[user] if password is None else password,
            "KAFKA_SSL_CA_LOCATION": str(self.ca),
        }

    def admin_env(self) -> dict[str, str]:
        """The super user's profile: it creates the topics, the principals and their ACLs."""
        return self.env("admin", (self.dir / "admin.password").read_text().strip())

    def admin(self) -> AdminClient:
        """The super user's admin client (kept: an admin client dropped cancels what it was doing)."""
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.address, **security_config(self.admin_env())})
        return self._admin

    def apply_matrix(self, topic_prefix: str, principal_prefix: str) -> None:
        """Every principal of ``deploy/kafka/acls.yaml`` made, with the ACLs the matrix grants it
        (by ``scripts.kafka_acls``, as an operator applies it), on topics and principals prefixed."""
        for name in load()["principals"]:
            self.add_user(principal_prefix + name)
        apply(self.admin(), grants(load(), topic_prefix, principal_prefix))

    def add_user(self, user: str) -> None:
        """A SCRAM-SHA-512 principal ``User:<user>`` with a password of its own (starting with the canary)."""
        password = f"{CANARY}-{secrets.token_hex(8)}"
        info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096)
        for future in (
            self.admin()
            .alter_user_scram_credentials([UserScramCredentialUpsertion(user, info, password.encode())])
            .values()
        ):
            future.result(timeout=30)
        self.passwords[user] = password

    def allow(self, user: str, prefix: str, operations: Iterable[str], resource: str = "TOPIC") -> None:
        """ACLs: ``user`` may do ``operations`` (READ, WRITE, DESCRIBE, ...) on the ``resource``s (topics,
        groups) named ``prefix``*."""
        bindings = [Grant(user, resource, prefix, True, operation).binding() for operation in operations]
        for future in self.admin().create_acls(bindings).values():
            future.result(timeout=30)


@dataclass(frozen=True)
class Tenant:
    """The matrix applied for one test: its topics start with ``topics``, its principals with ``users``."""

    topics: str
    users: str


def as_user(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """This process's Kafka clients connect with the profile ``env`` (a principal's, the admin's)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "secured" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.secured)


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    broker = SecuredBroker(tmp_path_factory.mktemp("secured"))
    broker.broker.start()
    try:
        yield broker
    finally:
        broker._admin = None  # before the broker goes: it would try to reconnect until the process ends
        broker.broker.stop()


@pytest.fixture
def tenant(secured: SecuredBroker) -> Tenant:
    name = uuid.uuid4().hex[:8]
    made = Tenant(f"s{name}.", f"s{name}-")
    secured.apply_matrix(made.topics, made.users)
    return made
