"""The async jobs' client against the real broker, without the workers: its view of the job table."""

from __future__ import annotations

import sys

import orjson

from clients.jobs import JobsClient
from dataflows.async_jobs import Settings
from operators.kafka import KafkaMessage, ensure_topics, produce


def test_a_fresh_client_knows_every_finished_job_before_it_answers(brokers: str, topic: str) -> None:
    settings = Settings(submit_topic=f"{topic}.submit", results_topic=f"{topic}.results")
    ensure_topics(brokers, settings.topics())
    ids = [f"job-{i}" for i in range(3_000)]
    submissions = [KafkaMessage(b"{}", key=i.encode(), topic=settings.submit_topic) for i in ids]
    results = [
        KafkaMessage(orjson.dumps({"job_id": i, "status": s}), key=i.encode(), topic=settings.results_topic)
        for s in ("running", "done")
        for i in ids
    ]
    produce(brokers, submissions + results)
    switch_s = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the interpreter between threads often, as a loaded machine does
    try:
        for start in range(10):  # the constructor returns once the view holds what the topics held
            with JobsClient(brokers, submit_topic=settings.submit_topic, results_topic=settings.results_topic) as jobs:
                behind = [i for i in ids if jobs.status(i)["status"] != "done"]
            assert not behind, f"start {start}: {len(behind)} finished jobs read as not done, e.g. {behind[:3]}"
    finally:
        sys.setswitchinterval(switch_s)
