"""Test fixtures and helpers, loaded as plugins by ``tests/conftest.py``."""
