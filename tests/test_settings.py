"""Settings read from the environment: each type parses, and a bad value names its variable and the form expected."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from operators import metrics
from operators.kafka import Position
from operators.settings import SettingsError, from_args, from_env
from operators.setup import DataflowSettings, TorchSettings
from patternflow.secrets import secret_field


@dataclass(frozen=True)
class Demo:
    brokers: str = field(default="x:1", metadata={"env": "KAFKA_BOOTSTRAP_SERVERS"})
    batch: int = 10
    ratio: float = 0.5
    on: bool = False
    start: Position = Position.earliest()  # noqa: RUF009
    path: Path = Path("var")
    names: tuple[str, ...] = ("a", "b")
    sizes: tuple[int, ...] = ()
    budgets: dict[str, float] = field(default_factory=dict)


def test_settings_parse_each_type_and_name_the_bad_variable() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "h:9", "D_BATCH": "7", "D_RATIO": "0.1", "D_ON": "yes", "D_START": "offset:4"}
    assert from_env(Demo, "D_", env) == Demo("h:9", 7, 0.1, True, Position.offset(4), Path("var"))
    assert from_env(Demo, "D_", {}) == Demo()
    with pytest.raises(SettingsError, match=r"D_BATCH='ten' is not valid: expected an integer"):
        from_env(Demo, "D_", {"D_BATCH": "ten"})
    with pytest.raises(SettingsError, match=r"D_START='first' is not valid: expected earliest, latest"):
        from_env(Demo, "D_", {"D_START": "first"})
    with pytest.raises(SettingsError, match=r"D_ON='maybe' is not valid: expected true or false"):
        from_env(Demo, "D_", {"D_ON": "maybe"})


def test_lists_are_comma_separated_with_blanks_and_spaces_ignored() -> None:
    s = from_env(Demo, "D_", {"D_NAMES": " calculator, fetch,,human, ", "D_SIZES": "1,2,3"})
    assert s.names == ("calculator", "fetch", "human")
    assert s.sizes == (1, 2, 3)
    assert from_env(Demo, "D_", {"D_NAMES": "solo"}).names == ("solo",)
    assert from_env(Demo, "D_", {"D_NAMES": ","}).names == (), "set, but to no items"


def test_mappings_are_name_value_pairs_with_typed_values() -> None:
    s = from_env(Demo, "D_", {"D_BUDGETS": "acme=0.5, beta = 1"})
    assert s.budgets == {"acme": 0.5, "beta": 1.0}


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("D_BUDGETS", "acme=lots", "comma-separated name=value pairs (e.g. a=1,b=2), each value a number"),
        ("D_BUDGETS", "acme", "comma-separated name=value pairs"),
        ("D_BUDGETS", "=1", "comma-separated name=value pairs"),
        ("D_SIZES", "1,two", "a comma-separated list, each item an integer"),
    ],
)
def test_a_bad_list_or_mapping_names_its_variable_and_the_form(variable: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env(Demo, "D_", {variable: value})
    assert str(caught.value).startswith(f"{variable}={value!r} is not valid: expected {expected}")


def test_the_agents_budgets_say_what_is_wrong() -> None:
    from dataflows.agent import Settings

    env = {"AGENT_LLM_URL": "http://x/v1", "AGENT_LLM_MODEL": "scripted", "AGENT_TENANT_BUDGETS_USD": "acme=lots"}
    with pytest.raises(SettingsError, match=r"^AGENT_TENANT_BUDGETS_USD='acme=lots' is not valid: expected "):
        from_env(Settings, "AGENT_", env)
    env["AGENT_TENANT_BUDGETS_USD"] = "acme=5,globex=1"
    assert from_env(Settings, "AGENT_", env).policy().tenant_budgets_usd == {"acme": 5.0, "globex": 1.0}


def test_command_line_flags_parse_lists_as_variables_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)  # flags fill in what the environment lacks
    s = from_args(Demo, "D_", ["--names", "x,y", "--budgets", "a=2"], "demo")
    assert s == Demo(names=("x", "y"), budgets={"a": 2.0})


@dataclass(frozen=True)
class Flow(TorchSettings):
    topic: str = "in"
    metrics_port: int = 9999


def test_a_dataflows_settings_add_their_own_to_the_shared_ones_under_its_prefix() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "h:9", "KAFKA_OUTAGE_LIMIT_S": "5", "F_START": "latest", "F_TORCH_THREADS": "2"}
    s = from_env(Flow, "F_", {**env, "F_TOPIC": "t"})
    assert s == Flow("h:9", 5.0, Position.latest(), 9999, 2, "t")
    assert isinstance(s, DataflowSettings) and Flow().metrics_port == 9999


CANARY = "canary-Pw-7f3a9c"


@dataclass(frozen=True)
class WithSecrets(DataflowSettings):
    llm_api_key: str = secret_field()  # marked
    store_password: str = ""  # not marked: its name says it
    chunk_tokens: int = 256  # a name like a secret's, but not one


def test_secret_settings_never_reach_the_metrics_labels_or_the_repr() -> None:
    env = {"S_LLM_API_KEY": CANARY, "S_STORE_PASSWORD": CANARY, "S_CHUNK_TOKENS": "64"}
    settings = from_env(WithSecrets, "S_", env)
    assert settings.llm_api_key == settings.store_password == CANARY
    metrics.serve(0, settings)
    scraped = generate_latest(REGISTRY).decode()
    (info,) = [line for line in scraped.splitlines() if 'dataflow="tests.test_settings"' in line]
    assert CANARY not in scraped
    assert 'llm_api_key="<redacted>"' in info and 'store_password="<redacted>"' in info
    assert 'chunk_tokens="64"' in info
    assert "llm_api_key" not in repr(settings)  # a marked secret is not even in the repr
