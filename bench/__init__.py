"""Benchmarks: `python -m bench.<name> [--quick]`; each prints one JSON object last."""
