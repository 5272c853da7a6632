"""Reusable Bytewax operators: Kafka I/O, dead-letter routing, metrics,
settings, RocksDB-backed keyed state and event-time windows."""
