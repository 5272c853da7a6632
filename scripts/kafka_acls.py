"""Apply the ACL matrix (``deploy/kafka/acls.yaml``) to a secured Kafka cluster.

    python -m scripts.kafka_acls [deploy/kafka/acls.yaml] [--topic-prefix P] [--principal-prefix Q] [--dry-run]

It connects as the super user through the client-security profile (``KAFKA_BOOTSTRAP_SERVERS``,
``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_*``, ``KAFKA_SSL_*``) and creates, for each principal of the
matrix, the ACLs it grants (creating an ACL that exists already changes nothing). ``--topic-prefix``
puts a prefix before every topic (a tenant's, or a test's, own topics), ``--principal-prefix`` before
every principal. It prints each grant; it never sees a password but the super user's, and never prints it.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from operators.kafka import admin_config
from patternflow import default_brokers

__all__ = ["MATRIX", "Grant", "apply", "grants", "load"]

MATRIX = Path(__file__).parent.parent / "deploy/kafka/acls.yaml"
# What each column of the matrix allows on a topic.
OPERATIONS = {
    "read": ("READ", "DESCRIBE"),
    "write": ("WRITE", "DESCRIBE"),
    "describe_configs": ("DESCRIBE_CONFIGS",),
}


@dataclass(frozen=True)
class Grant:
    """One ACL: ``principal`` (a user name) may do ``operation`` on the topic or group ``name``
    (a prefix when ``prefixed``)."""

    principal: str
    resource: str  # TOPIC or GROUP
    name: str
    prefixed: bool
    operation: str

    def binding(self) -> AclBinding:
        pattern = ResourcePatternType.PREFIXED if self.prefixed else ResourcePatternType.LITERAL
        return AclBinding(
            ResourceType[self.resource],
            self.name,
            pattern,
            f"User:{self.principal}",
            "*",
            AclOperation[self.operation],
            AclPermissionType.ALLOW,
        )

    def __str__(self) -> str:
        return f"User:{self.principal} {self.operation} {self.resource} {self.name}{'*' if self.prefixed else ''}"


def load(path: Path = MATRIX) -> dict[str, Any]:
    matrix = yaml.safe_load(path.read_text())
    if not isinstance(matrix, dict) or not isinstance(matrix.get("principals"), dict):
        raise ValueError(f"{path}: expected a mapping with 'group' and 'principals'")
    return matrix


def grants(matrix: Mapping[str, Any], topic_prefix: str = "", principal_prefix: str = "") -> list[Grant]:
    """Every ACL the matrix grants, topics and principals prefixed."""
    out: list[Grant] = []
    for name, columns in matrix["principals"].items():
        principal = principal_prefix + name
        unknown = set(columns) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"principal {name!r}: unknown column(s) {sorted(unknown)}; expected {sorted(OPERATIONS)}")
        for column, topics in columns.items():
            for topic in topics:
                prefixed = topic.endswith("*")
                full = topic_prefix + topic.removesuffix("*")
                out.extend(Grant(principal, "TOPIC", full, prefixed, op) for op in OPERATIONS[column])
        if columns.get("read"):
            # librdkafka looks up its consumer's group; a dataflow's sources commit their snapshots'
            # offsets to the group <group>.<dataflow id> (the lag tools read it; recovery never does).
            out.append(Grant(principal, "GROUP", matrix["group"], False, "DESCRIBE"))
            out.extend(Grant(principal, "GROUP", f"{matrix['group']}.{name}", False, op) for op in ("READ", "DESCRIBE"))
    return list(dict.fromkeys(out))  # read and write both grant DESCRIBE: once is enough


def apply(admin: AdminClient, to_grant: Sequence[Grant], timeout_s: float = 30.0) -> None:
    """Create the ACLs; an error names the grant the broker refused."""
    futures = admin.create_acls([g.binding() for g in to_grant])
    for grant, future in zip(to_grant, futures.values(), strict=True):
        try:
            future.result(timeout=timeout_s)
        except (KafkaException, TimeoutError) as exc:
            raise RuntimeError(f"the broker refused {grant}: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("matrix", nargs="?", type=Path, default=MATRIX)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--principal-prefix", default="")
    parser.add_argument("--dry-run", action="store_true", help="print the grants, apply nothing")
    args = parser.parse_args(argv)
    to_grant = grants(load(args.matrix), args.topic_prefix, args.principal_prefix)
    for grant in to_grant:
        print(grant)
    if not args.dry_run:
        apply(AdminClient(admin_config(default_brokers())), to_grant)
        print(f"applied {len(to_grant)} ACLs")


if __name__ == "__main__":
    main()
