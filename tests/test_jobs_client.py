"""Async jobs against the real broker, without running the workers: the client's view of the job
table, and the workers' lookup of the results they published before a restart."""

from __future__ import annotations

import sys

import orjson

from clients.jobs import JobsClient
from dataflows.async_jobs import Settings
from dataflows.async_jobs.jobs import Job, Parsed
from dataflows.async_jobs.published import PublishedResults
from operators.kafka import KafkaMessage, ensure_topics, produce
from patternflow import wall_ms


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


def test_the_workers_find_the_results_they_published_before_a_restart(brokers: str, topic: str) -> None:
    settings = Settings(submit_topic=f"{topic}.submit", results_topic=f"{topic}.results")
    ensure_topics(brokers, settings.topics())
    submitted_ms = wall_ms() - 1_000
    jobs = {i: Job(i, "tabular-risk", [[0.0] * 8], submitted_ms, submitted_ms + 1) for i in ("done", "running", "new")}
    done = jobs["done"].result("done", finished_ms=submitted_ms + 2, version="1", outputs=[{"risk": 0.25}])
    published = [jobs["done"].result("running"), done, jobs["running"].result("running")]
    produce(brokers, [r.to_message(settings.results_topic) for r in published])
    lookup = PublishedResults(brokers, settings.results_topic, max_clock_skew_ms=60_000, outage_limit_s=30)
    later = Job("later", "tabular-risk", [[0.0] * 8], wall_ms() + 120_000, wall_ms() + 120_000)  # never looked up

    split = lookup.split(Parsed(jobs=[*jobs.values(), later]))
    assert [job.job_id for job in split.jobs] == ["running", "new", "later"]
    assert split.published == [done]
    assert lookup.split(Parsed(jobs=[later])) == Parsed(jobs=[later])
