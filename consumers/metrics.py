"""Prometheus metrics of the sink. The registry is injected, so tests and an app embedding several
components each get their own (no global-registry collisions)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 10, 100, 500, 1_000, 2_500, 5_000, 10_000, 20_000, 50_000, 100_000)
_FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.messages = Counter(
            "arus_sink_messages", "Kafka messages consumed by the sink", ["topic"], registry=registry
        )
        self.rows_written = Counter(
            "arus_sink_rows_written",
            "Rows handed to PostgreSQL per table (replayed rows that changed nothing included)",
            ["table"],
            registry=registry,
        )
        self.poison = Counter(
            "arus_sink_poison_messages",
            "Messages the sink could not convert, stored as processing_error dead letters",
            ["topic"],
            registry=registry,
        )
        self.errors = Counter(
            "arus_sink_errors", "Errors by kind (db, commit, isolate; replay_upsert: readings already present, staged upsert used)", ["kind"], registry=registry
        )
        self.batch_rows = Histogram(
            "arus_sink_batch_rows", "Rows per flush", buckets=_BATCH_BUCKETS, registry=registry
        )
        self.flush_seconds = Histogram(
            "arus_sink_flush_seconds",
            "Duration of one flush (DB transaction and offset commit)",
            buckets=_FLUSH_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            "arus_sink_consumer_lag",
            "Messages behind the partition's high watermark after the last fetch",
            ["topic", "partition"],
            registry=registry,
        )
        self.last_flush = Gauge(
            "arus_sink_last_flush_timestamp_seconds", "Unix time of the last successful flush", registry=registry
        )
