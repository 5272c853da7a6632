"""The suite's fixtures live in plugin modules under ``tests/support/`` (one per dataflow that
tests run as a process, plus the broker and process helpers); test files import helpers from
there, never from this file or from each other."""

pytest_plugins = [
    "tests.support.processes",
    "tests.support.kafka",
    "tests.support.online",
    "tests.support.fraud",
    "tests.support.rag",
    "tests.support.agent",
    "tests.support.secured",
]
