"""Worker metrics, declared once against an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events_in = Counter("arus_worker_events_in_total", "Messages consumed", ["stage"], registry=registry)
        self.events_out = Counter("arus_worker_records_out_total", "Records produced", ["stage"],
                                  registry=registry)
        self.rejected = Counter("arus_worker_rejected_total", "Dead-lettered inputs", ["stage", "reason"],
                                registry=registry)
        self.batch_seconds = Histogram("arus_worker_batch_seconds", "Time to fold one consumed batch",
                                       ["stage"], registry=registry,
                                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.checkpoint_seconds = Histogram("arus_worker_checkpoint_seconds", "Checkpoint duration", ["stage"],
                                            registry=registry)
        self.restore_seconds = Histogram("arus_worker_restore_seconds", "State restore duration", ["stage"],
                                         registry=registry)
        self.event_age = Histogram(
            "arus_worker_event_age_seconds", "Broker append time to processed (end-to-end lag of the stage)",
            ["stage"], registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.lag = Gauge("arus_worker_consumer_lag", "Messages behind the partition's high watermark",
                         ["stage", "partition"], registry=registry)
        self.partitions = Gauge("arus_worker_partitions", "Assigned partitions", ["stage"], registry=registry)
