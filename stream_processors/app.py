"""Assembly of the stream-processor worker: the telemetry hot path and the kecamatan merge stage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from infra.kafka_admin import ensure_topics
from infra.settings import Settings
from infra.topics import all_topics
from schemas import topics
from schemas.envelope import STATUS_TYPE

from .device_status import DeviceStatusHandler
from .metrics import WorkerMetrics
from .region_merge import RegionMergePartition
from .registry import DeviceRegistry
from .runtime import StreamRunner
from .telemetry import TelemetryPartition
from .validation import TimePolicy

log = logging.getLogger("arus.worker")


def build_runners(settings: Settings, registry: DeviceRegistry, metrics: WorkerMetrics) -> list[StreamRunner]:
    assert settings.kafka_bootstrap, "ARUS_KAFKA_BOOTSTRAP is not set"
    size_ms = settings.window_seconds * 1000
    policy = TimePolicy(settings.max_age_s * 1000, settings.max_future_s * 1000)
    ingest = settings.topic(topics.INGEST)
    partials = settings.topic(topics.REGION_PARTIALS)
    common = dict(
        bootstrap=settings.kafka_bootstrap, topic_name=settings.topic, metrics=metrics,
        batch_max=settings.batch_max, linger_ms=settings.batch_linger_ms,
        checkpoint_interval_ms=settings.checkpoint_interval_ms,
        session_timeout_ms=settings.worker_session_timeout_ms,
    )
    def _ingest_partition(p: int) -> TelemetryPartition:
        part = TelemetryPartition(p, ingest, size_ms, settings.allowed_lateness_s * 1000, policy, lambda: registry)
        part.handlers[STATUS_TYPE] = DeviceStatusHandler(p, ingest, lambda: registry)
        return part

    telemetry = StreamRunner(
        name="telemetry", group_id=f"{settings.consumer_group_prefix}-worker",
        source_topic=ingest, state_topic=settings.topic(topics.WINDOW_STATE),
        factory=lambda p: _ingest_partition(p),
        **common,  # type: ignore[arg-type]
    )
    region = StreamRunner(
        name="region-merge", group_id=f"{settings.consumer_group_prefix}-region-merge",
        source_topic=partials, state_topic=settings.topic(topics.REGION_STATE),
        factory=lambda p: RegionMergePartition(p, partials, size_ms,
                                               settings.allowed_lateness_s * 1000 + settings.region_retention_s * 1000),
        **common,  # type: ignore[arg-type]
    )
    return [telemetry, region]


async def _refresh_loop(registry: DeviceRegistry, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(registry.refresh)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=registry.refresh_s)


async def run_worker_async(settings: Settings, registry_metrics: CollectorRegistry | None = None) -> None:
    prom = registry_metrics or CollectorRegistry()
    metrics = WorkerMetrics(prom)
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, registry=prom)
    registry = DeviceRegistry(settings.database_dsn() if settings.database_url else None)
    await asyncio.to_thread(registry.refresh)
    assert settings.kafka_bootstrap, "ARUS_KAFKA_BOOTSTRAP is not set"
    # the state topics must mirror their sources partition for partition: create what is missing
    await asyncio.to_thread(ensure_topics, settings.kafka_bootstrap,
                            list(all_topics(settings).values()), settings.partitions)
    runners = build_runners(settings, registry, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(r.run(), name=r.name) for r in runners]
    tasks.append(asyncio.create_task(_refresh_loop(registry, stop)))
    log.info("worker started: %s", ", ".join(r.source_topic for r in runners))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for r in runners:
        await r.stop()
    stop.set()
    # a runner still connecting (Kafka down) must not hold the shutdown: give the others time to
    # checkpoint and commit, then cancel what is left
    _, stuck = await asyncio.wait(tasks, timeout=15)
    for t in stuck:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for t in done:
        if t is not stopper and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]


def run_worker(settings: Settings) -> None:
    asyncio.run(run_worker_async(settings))
