"""The platform as a user deploys it: every pattern's dataflow on the real broker (on this
module's own topics), a real Prometheus (Debian's package) scraping them with the jobs and
labels of ``deploy/prometheus.yml``, traffic through each, some of it malformed.

Checked: ``patternflow audit`` finds each antipattern in a misused dataflow (a streaming
dataflow run without recovery, a bulk client of online inference, a RAG index no eval run
was recorded for) and nothing in the clean deployment; every Grafana panel's PromQL returns
data; ``patternflow report`` draws every panel, and headless Chromium (Debian's package)
loads the page and every figure with no console message. (The agent loop's unbounded caps
are found in ``test_audit.py``.) The tests run in order and build on each other."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from advisor.audit import Scrape, scrape
from advisor.report import Panel, dashboards, query_range
from clients.agents import AgentClient
from clients.inference import InferenceClient
from clients.jobs import JobsClient
from dataflows.launch import run_command
from models.scripted_llm import RECORDINGS, ScriptedModel, serve
from operators.kafka import KafkaMessage, TopicSpec, ensure_topics, produce, read_topic
from patternflow import free_port, wall_ms
from scripts.beir import load
from scripts.evaluate_anomalies import shuttle
from scripts.fraud_traffic import generate, table_messages
from tests.support.commands import DATAFLOWS, env_prefix, patternflow
from tests.support.event_counts import KEYS
from tests.support.processes import ROOT, Logged, wait_for

pytestmark = pytest.mark.platform

MINI = ROOT / "tests" / "data" / "scifact-mini"
PANELS = [panel for _, panels in dashboards() for panel in panels]


def features(i: int) -> list[float]:
    return [((i * 7 + j * 3) % 11) / 5 - 1 for j in range(8)]


class Prometheus:
    """Debian's ``prometheus``, scraping every second with ``deploy/prometheus.yml``'s jobs and labels."""

    def __init__(self, ports: dict[str, int], workdir: Path) -> None:
        binary = shutil.which("prometheus")
        assert binary, "Prometheus is not installed: apt-get install prometheus (.ci/run does)"
        config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        for job in config["scrape_configs"]:
            for group in job["static_configs"]:
                group["targets"] = [f"127.0.0.1:{ports[group['labels']['dataflow']]}"]
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        args = [f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}"]
        self.proc = Logged(
            [binary, *args, f"--web.listen-address=127.0.0.1:{port}"], dict(os.environ), workdir / "p.log"
        )
        wait_for(lambda: self.proc.poll() is None and self._ready(), "Prometheus to be ready", timeout_s=60)

    def _ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Deployment:
    """Dataflows with every ``*_topic`` setting (and the agent's topic prefix) under this module's
    prefix, their state and recovery in its directory, and their metrics on the ports Prometheus scrapes."""

    def __init__(self, brokers: str, workdir: Path) -> None:
        self.brokers, self.workdir = brokers, workdir
        self.prefix = f"pf-{uuid.uuid4().hex[:8]}"
        self.ports = {name: free_port() for name in DATAFLOWS}
        self.procs: dict[str, Logged] = {}
        self.started = time.time()

    def topic(self, dataflow: str, field: str) -> str:
        (default,) = [f.default for f in self._fields(dataflow) if f.name == field]
        return f"{self.prefix}.{default}"

    def _fields(self, dataflow: str) -> tuple[dataclasses.Field[Any], ...]:
        return dataclasses.fields(import_module(f"dataflows.{dataflow}").Settings)

    def env(self, dataflow: str, name: str, port: int, **extra: str) -> dict[str, str]:
        prefix = env_prefix(dataflow)
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": self.brokers, f"{prefix}METRICS_PORT": str(port)}
        for f in self._fields(dataflow):
            if f.name.endswith("_topic") or f.name == "topic_prefix":
                env[prefix + f.name.upper()] = self.topic(dataflow, f.name)
            elif f.name.endswith("_dir"):
                env[prefix + f.name.upper()] = str(self.workdir / name / f.name)
        return {**env, **extra}

    def start(self, dataflow: str, *, name: str = "", port: int = 0, recovery: bool = True, **extra: str) -> str:
        """Start ``dataflow`` (as ``name``: a second, misused one); return its metrics target."""
        name = name or dataflow
        port = port or self.ports[dataflow]
        flow = f"dataflows.{dataflow}:build()"
        cmd = (
            run_command(flow, self.workdir / name / "recovery")
            if recovery
            else [sys.executable, "-m", "bytewax.run", flow]
        )
        (self.workdir / name).mkdir(parents=True, exist_ok=True)
        self.procs[name] = Logged(cmd, self.env(dataflow, name, port, **extra), self.workdir / f"{name}.log")
        target = f"127.0.0.1:{port}"

        def answers() -> Scrape | None:
            proc = self.procs[name]
            assert proc.poll() is None, f"{name} exited:\n{proc.output()}"
            return scrape(target)

        wait_for(answers, f"{name}'s metrics endpoint", timeout_s=120, every_s=0.5)
        return target

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture(scope="module")
def platform(brokers: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployment, Prometheus]]:
    workdir = tmp_path_factory.mktemp("platform")
    deployment = Deployment(brokers, workdir)
    prometheus = Prometheus(deployment.ports, workdir)
    try:
        yield deployment, prometheus
    finally:
        deployment.stop_all()
        prometheus.stop()


def audit(*targets: str) -> tuple[int, list[dict[str, Any]]]:
    out = patternflow("audit", "--targets", ",".join(targets), "--json")
    assert out.returncode in (0, 1), out.stdout + out.stderr
    return out.returncode, orjson.loads(out.stdout)["findings"]


def found(target: str, antipattern: str) -> dict[str, Any]:
    """The one finding at ``target``, which must be ``antipattern`` (and the exit code 1)."""
    code, findings = audit(target)
    assert code == 1 and [f["antipattern"] for f in findings] == [antipattern], findings
    return findings[0]


def until(target: str, what: str, check: Any, timeout_s: float = 120) -> Scrape:
    def met() -> Scrape | None:
        s = scrape(target)
        return s if s is not None and check(s) else None

    return wait_for(met, what, timeout_s=timeout_s, every_s=0.5)


def index_info(s: Scrape) -> dict[str, str]:
    """The labels of a RAG dataflow's ``patternflow_rag_index_info`` (none while it loads its model)."""
    return next((ls for n, ls, _ in s.samples if n == "patternflow_rag_index_info"), {})


def bad(topic: str) -> KafkaMessage:
    return KafkaMessage(b"{not json", key=b"bad", topic=topic)


def test_streaming_without_state_is_found_and_the_dataflows_with_recovery_are_clean(
    platform: tuple[Deployment, Prometheus],
) -> None:
    d, _ = platform
    clean = [
        d.start("event_counts", EVENT_COUNTS_WINDOW_MS="1000"),
        d.start("telemetry_anomalies"),
        d.start("fraud_detection", FRAUD_LABEL_WINDOW_MS="900000", FRAUD_ALLOWED_LATENESS_MS="21600000"),
    ]
    # What a newcomer types: python -m bytewax.run "dataflows.event_counts:build()", no -r.
    output = {"EVENT_COUNTS_OUTPUT_TOPIC": f"{d.prefix}.stateless.counts"}
    stateless = d.start("event_counts", name="stateless", port=free_port(), recovery=False, **output)

    events_topic = d.topic("event_counts", "input_topic")
    now = wall_ms()
    events = [
        KafkaMessage(
            orjson.dumps({"key": KEYS[i % 20], "ts_ms": now + i}), key=KEYS[i % 20].encode(), topic=events_topic
        )
        for i in range(2_000)
    ]
    produce(d.brokers, [*events, bad(events_topic)])
    telemetry = d.topic("telemetry_anomalies", "input_topic")
    shuttle_events = [KafkaMessage(orjson.dumps(e), key=b"shuttle", topic=telemetry) for e in shuttle(3_000)]
    produce(d.brokers, shuttle_events[:1_500])
    traffic = generate(300, seed=3)
    produce(d.brokers, table_messages(traffic, d.topic("fraud_detection", "merchants_topic")))
    payments = d.topic("fraud_detection", "payments_topic")
    produce(
        d.brokers, [KafkaMessage(orjson.dumps(p), key=p["card"].encode(), topic=payments) for p in traffic.payments]
    )

    until(stateless, "the stateless dataflow to count", lambda s: s.total("patternflow_items_total") >= 2_000)
    for target in clean:
        until(target, f"{target} to snapshot its state", lambda s: s.total("patternflow_state_keys") > 0)
    # Prequential figures are recomputed at most every 2 s: labels after a pause show them.
    time.sleep(2.5)
    produce(d.brokers, shuttle_events[1_500:])
    until(clean[1], "the model's PR-AUC", lambda s: s.total("patternflow_model_pr_auc") > 0)
    finding = found(stateless, "streaming without state")
    assert finding["dataflow"] == "event_counts"
    assert finding["evidence"][0].startswith("runs without a recovery directory (python -m bytewax.run ... -r DIR)")
    assert audit(*clean) == (0, [])
    d.stop("stateless")


ONLINE_SEEN = 'patternflow_inference_seconds_count{job="online"}'


def test_online_serving_for_batch_shaped_work_is_found_and_tight_deadlines_are_clean(
    platform: tuple[Deployment, Prometheus],
) -> None:
    d, prometheus = platform
    clean = d.start("online_inference", ONLINE_MODELS="tabular-risk")
    bulk_requests = f"{d.prefix}.bulk.requests"
    bulk = d.start(
        "online_inference",
        name="bulk",
        port=free_port(),
        ONLINE_MODELS="tabular-risk",
        ONLINE_REQUEST_TOPIC=bulk_requests,
    )
    replies = d.topic("online_inference", "reply_topic")
    # A caller with a 1 s budget (the client's default), and a script that sends 600 rows it could wait for.
    callers = ((d.topic("online_inference", "request_topic"), 1.0, clean), (bulk_requests, 60.0, bulk))
    for request_topic, timeout_s, target in callers:
        with InferenceClient(d.brokers, request_topic=request_topic, reply_topic=replies, timeout_s=timeout_s) as c:
            c.wait_until_serving("tabular-risk", features(0))
            if target == clean:
                # The dashboards' latency and batch-fill rates need counters Prometheus saw move: it
                # first scrapes them as the first request left them, then the 600 requests follow.
                wait_for(lambda: query_range(prometheus.url, ONLINE_SEEN, d.started, time.time()), "a first scrape")
            for first in range(0, 600, 50):
                futures = [c.submit("tabular-risk", features(i))[1] for i in range(first, first + 50)]
                assert all(f.result(timeout=60)["status"] in ("ok", "timeout") for f in futures)

    finding = found(bulk, "online serving for batch-shaped work")
    assert "100% of them with no deadline or more than 1 s to it" in finding["evidence"][0]
    assert "batch job" in finding["evidence"][2]
    tight = until(clean, "the tight requests counted", lambda s: s.total("patternflow_online_requests_total") >= 600)
    assert tight.total("patternflow_online_requests_total", budget="tight") >= 600
    assert audit(clean) == (0, [])
    d.stop("bulk")


def test_rag_without_eval_is_found_until_an_eval_run_is_recorded_for_its_index(
    platform: tuple[Deployment, Prometheus],
) -> None:
    d, _ = platform
    target = d.start("rag", RAG_SHARDS="2")
    until(target, "the index version published (its model loaded)", lambda s: "version" in index_info(s))
    finding = found(target, "RAG without retrieval eval")
    assert "minilm-embeddings@" in finding["evidence"][0] and "chunks 256+32" in finding["evidence"][0]

    documents = d.topic("rag", "documents_topic")
    # The documents judged for the 10 queries asked below, among as many others: enough for the eval's
    # figures to mean something (retrieval quality itself is tests/test_rag_eval.py's), a fifth of the time.
    data = load(MINI)
    queries, qrels = data.split("test")
    judged = {doc_id for qid in list(queries)[:10] for doc_id in qrels[qid]}
    others = [doc_id for doc_id in data.corpus if doc_id not in judged][: len(judged)]
    corpus = {doc_id: data.corpus[doc_id] for doc_id in sorted(judged | set(others))}
    docs = [
        KafkaMessage(orjson.dumps({"title": doc["title"], "text": doc["text"]}), key=doc_id.encode(), topic=documents)
        for doc_id, doc in corpus.items()
    ]
    produce(d.brokers, [*docs, bad(documents)])
    until(
        target, "the corpus indexed", lambda s: s.total("patternflow_items_total", step="rag.embed") >= len(corpus), 300
    )
    topics = [d.topic("rag", f) for f in ("queries_topic", "answers_topic", "evals_topic")]
    with InferenceClient(d.brokers, request_topic=topics[0], reply_topic=topics[1], timeout_s=30) as client:
        client.wait_until_serving("rag", {"query": "cells"})
    time.sleep(2.5)  # scraped with a first query answered: the latency panel's rates need the eval's to follow
    args = ["--data", str(MINI), "--limit", "10", "--queries-topic", topics[0], "--answers-topic", topics[1]]
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": d.brokers}
    produce(d.brokers, [bad(topics[2])])  # a malformed eval record is dead-lettered, and the dataflow runs on
    run = [sys.executable, "-m", "scripts.eval_rag", *args, "--evals-topic", topics[2]]
    out = subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    figures = orjson.loads(out.stdout.splitlines()[-1])
    assert figures["ndcg@10"] > 0.5, "the judged documents are in the index"

    recorded = until(target, "the eval run exported", lambda s: s.total("patternflow_rag_eval", metric="ndcg@10") > 0)
    assert abs(recorded.total("patternflow_rag_eval", split="test", metric="ndcg@10") - figures["ndcg@10"]) < 1e-3
    assert audit(target) == (0, [])
    (dead,) = read_topic(d.brokers, topics[2] + ".dlq")
    assert dead.header("dlq.step") == b"rag.parse_evals" and b"not JSON" in (dead.header("dlq.reason") or b"")


def test_batch_jobs_and_async_jobs_report_progress(platform: tuple[Deployment, Prometheus]) -> None:
    d, prometheus = platform
    d.start("async_jobs", JOBS_MODELS="tabular-risk")
    submit = d.topic("async_jobs", "submit_topic")
    with JobsClient(d.brokers, submit_topic=submit, results_topic=d.topic("async_jobs", "results_topic")) as client:
        ids = [client.submit("tabular-risk", [features(i + j) for j in range(10)]) for i in range(20)]
        produce(d.brokers, [bad(submit)])
        assert all(client.wait(job_id, timeout_s=120)["status"] == "done" for job_id in ids)

    rows = f"{d.prefix}.rows"
    ensure_topics(d.brokers, [TopicSpec(rows, partitions=2)])
    produce(
        d.brokers,
        (KafkaMessage(orjson.dumps({"inputs": features(i)}), key=f"r{i}".encode(), topic=rows) for i in range(300_000)),
    )
    env = d.env("batch_inference", "batch", d.ports["batch_inference"])
    job = [sys.executable, "-m", "dataflows.batch_inference", "--job", "rows", "--input", f"kafka:{rows}"]
    started = time.monotonic()
    out = subprocess.run(job, env=env, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"the job took {time.monotonic() - started:.1f} s")
    progress = 'patternflow_batch_rows_total{job="batch",dataflow="batch_inference"}'
    assert query_range(prometheus.url, progress, d.started, time.time()), "Prometheus scraped the job while it ran"


def test_agent_loop_with_caps_is_clean(platform: tuple[Deployment, Prometheus]) -> None:
    d, _ = platform
    model = ScriptedModel(orjson.loads(RECORDINGS.read_bytes()))
    with serve(model, free_port()) as url:
        runtime = d.start("agent", AGENT_LLM_URL=url, AGENT_LLM_MODEL="scripted")
        tools = d.start("agent_tools")
        with AgentClient(d.brokers, topic_prefix=d.topic("agent", "topic_prefix")) as client:
            produce(d.brokers, [bad(client.topics.tasks)])
            # Tasks in two waves, a scrape apart: the dashboards' rates need the counters to move.
            for wave in range(2):
                done = [client.submit("What is 17 * 23 + 4?", tools=["calculator"]) for _ in range(3)]
                capped = client.submit("Keep counting", tools=["calculator"], caps={"max_iterations": 3})
                assert [client.wait(t, timeout_s=120)["status"] for t in done] == ["done"] * 3
                assert client.wait(capped, timeout_s=120)["status"] == "cap_exceeded"
                until(
                    runtime,
                    "the tasks counted",
                    lambda s, n=4 * (wave + 1): s.total("patternflow_agent_tasks_total") >= n,
                )
                time.sleep(2.5)
        assert audit(runtime, tools) == (0, [])


def test_the_clean_deployment_has_no_antipattern(platform: tuple[Deployment, Prometheus]) -> None:
    d, _ = platform
    running = [f"127.0.0.1:{port}" for name, port in d.ports.items() if name != "batch_inference"]
    out = patternflow("audit", "--targets", ",".join(running), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = orjson.loads(out.stdout)
    assert sorted(report["dataflows"]) == sorted(n for n in DATAFLOWS if n != "batch_inference")
    assert report["findings"] == []


@pytest.mark.parametrize("panel", PANELS, ids=[f"{p.dashboard}: {p.title[:50]}" for p in PANELS])
def test_every_dashboard_panel_returns_data(platform: tuple[Deployment, Prometheus], panel: Panel) -> None:
    d, prometheus = platform

    def finite() -> bool:
        series = query_range(prometheus.url, panel.expr, d.started, time.time())
        return any(math.isfinite(v) for _, points in series for _, v in points)

    wait_for(finite, f"data for {panel.expr}", timeout_s=20, every_s=1)


def test_the_report_draws_every_panel_and_chromium_shows_it_without_a_console_message(
    platform: tuple[Deployment, Prometheus], tmp_path: Path
) -> None:
    d, prometheus = platform
    since = f"{math.ceil(time.time() - d.started) + 5}s"
    out = patternflow("report", "--prometheus", prometheus.url, "--since", since, "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(PANELS)} of {len(PANELS)} panels have data" in out.stdout
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == len(PANELS) and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    chromium = shutil.which("chromium")
    assert chromium, "Chromium is not installed: apt-get install chromium (.ci/run does)"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    page = (tmp_path / "index.html").as_uri()
    shown = subprocess.run(
        [*cmd, "--virtual-time-budget=10000", "--dump-dom", page], capture_output=True, text=True, timeout=120
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    console = [line for line in shown.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "the page logged to the console"
    assert f'data-figures="{len(PANELS)}"' in shown.stdout
    assert f'data-loaded="{len(PANELS)}"' in shown.stdout, "every figure loaded"
