"""The suite's fixtures live in plugin modules under ``tests/support/``; test files import
helpers from there, never from this file."""

pytest_plugins = ["tests.support.processes", "tests.support.kafka"]
