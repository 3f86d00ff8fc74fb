"""Assembly of the stream-processor worker: the telemetry hot path and the kecamatan merge stage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import faust
import mode
from prometheus_client import CollectorRegistry

from infra.health import serve_health
from infra.kafka_admin import ensure_topics
from infra.memory import fix_mmap_threshold, trim_heap
from infra.privacy import pii_key_bytes
from infra.settings import Settings
from infra.topics import all_topics
from schemas import topics
from schemas.alerts import COMMAND_TYPE
from schemas.envelope import STATUS_TYPE
from schemas.service_events import SERVICE_MAX_AGE_MS, SERVICE_MAX_FUTURE_MS

from .alerting.handler import AlertHandler, RegionAlerts
from .alerting.rules import load_rules
from .device_status import DeviceStatusHandler
from .metrics import WorkerMetrics
from .region_merge import RegionMergePartition
from .registry import DeviceRegistry
from .runtime import StreamRunner
from .service_events import ServiceEventHandler
from .telemetry import TelemetryPartition
from .validation import TimePolicy

log = logging.getLogger("arus.worker")


def build_runners(settings: Settings, registry: DeviceRegistry, metrics: WorkerMetrics) -> list[StreamRunner]:
    assert settings.kafka_bootstrap, "ARUS_KAFKA_BOOTSTRAP is not set"
    size_ms = settings.window_seconds * 1000
    policy = TimePolicy(settings.max_age_s * 1000, settings.max_future_s * 1000)
    ingest = settings.topic(topics.INGEST)
    partials = settings.topic(topics.REGION_PARTIALS)
    rules = load_rules(settings.rules_file)  # a bad rules file stops the worker here, with the rule and field
    log.info("alert rules: %d from %s", len(rules.rules), rules.source)
    common = dict(
        bootstrap=settings.kafka_bootstrap, topic_name=settings.topic, metrics=metrics,
        batch_max=settings.batch_max, linger_ms=settings.batch_linger_ms,
        checkpoint_interval_ms=settings.checkpoint_interval_ms,
        full_snapshot_every=settings.checkpoint_full_every,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        fetch_max_wait_ceiling_ms=settings.kafka_fetch_max_wait_ceiling_ms,
        session_timeout_ms=settings.worker_session_timeout_ms,
    )
    def _ingest_partition(p: int) -> TelemetryPartition:
        part = TelemetryPartition(p, ingest, size_ms, settings.allowed_lateness_s * 1000, policy, lambda: registry)
        part.refresh_registry = registry.refresh_if_older_than
        part.aggregate_interval_ms = settings.aggregate_emit_interval_ms
        status = DeviceStatusHandler(p, ingest, lambda: registry, settings.device_silence_factor)
        part.handlers[STATUS_TYPE] = status
        part.observers.append(status)  # readings make a device online; silence makes it offline
        # alert rules: readings (threshold/rate/absence), SLA timers, operators' commands; state checkpointed
        alerts = AlertHandler(rules, p, ingest, lambda: part.watermark)
        part.handlers[COMMAND_TYPE] = alerts
        part.observers.append(alerts)
        # agency service events (jember.welfare., jember.complaint., ...): listeners see each accepted,
        # pseudonymised event (e.g. SLA alert rules)
        service_listeners: list[Any] = [alerts.on_service_event]
        ServiceEventHandler(p, ingest, pii_key_bytes(settings.pii_key), SERVICE_MAX_AGE_MS, SERVICE_MAX_FUTURE_MS,
                            listeners=service_listeners).register(part.handlers)
        return part

    def _merge_partition(p: int) -> RegionMergePartition:
        lateness_ms = settings.allowed_lateness_s * 1000
        merge = RegionMergePartition(p, partials, size_ms, lateness_ms + settings.region_retention_s * 1000,
                                     lateness_ms=lateness_ms, expected_sources=settings.partitions)
        region_alerts = RegionAlerts(rules, size_ms)  # aggregate rules over the kecamatan windows
        if region_alerts.active:
            merge.alerts = region_alerts
        return merge

    telemetry = StreamRunner(
        name="telemetry", group_id=f"{settings.consumer_group_prefix}-worker",
        source_topic=ingest, state_topic=settings.topic(topics.WINDOW_STATE),
        factory=lambda p: _ingest_partition(p),
        **common,  # type: ignore[arg-type]
    )
    region = StreamRunner(
        name="region-merge", group_id=f"{settings.consumer_group_prefix}-region-merge",
        source_topic=partials, state_topic=settings.topic(topics.REGION_STATE),
        factory=lambda p: _merge_partition(p),
        **common,  # type: ignore[arg-type]
    )
    from .alerting.rules import IndicatorRule
    from .indicators.stage import indicator_runners  # program indicators (docs/indicators.md)

    return [telemetry, region, *indicator_runners(settings, common, rules.of_type(IndicatorRule))]


async def _refresh_loop(registry: DeviceRegistry, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.to_thread(registry.refresh)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=registry.refresh_s)


TRIM_EVERY_S = 10.0


async def _trim_loop(stop: asyncio.Event) -> None:
    """Free heap pages back to the OS every few seconds: snapshot and fetch bursts leave the glibc
    heap mostly free but fragmented, and RSS would keep that high-water mark (infra/memory.py)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=TRIM_EVERY_S)
        trim_heap()


class StreamHost(mode.Service):
    """The processors as a service of the Faust app: Faust runs the worker's lifecycle (signals,
    graceful stop, crash handling) while the hot path consumes in batches through its own runtime
    (a Faust stream measured 13.5k events/s with take_events here, below the 20k per core bar, and
    Faust tables cannot be updated from a batch; see docs/performance.md)."""

    def __init__(self, settings: Settings, prom: CollectorRegistry, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.prom = prom
        self.runners: list[StreamRunner] = []
        self.tasks: list[asyncio.Task[Any]] = []
        self.stop_event = asyncio.Event()

    async def on_start(self) -> None:
        settings = self.settings
        metrics = WorkerMetrics(self.prom)
        registry = DeviceRegistry(settings.database_dsn() if settings.database_url else None)
        await asyncio.to_thread(registry.refresh)
        assert settings.kafka_bootstrap, "ARUS_KAFKA_BOOTSTRAP is not set"
        # the state topics must mirror their sources partition for partition: create what is missing
        await asyncio.to_thread(ensure_topics, settings.kafka_bootstrap,
                                list(all_topics(settings).values()), settings.partitions)
        self.runners = build_runners(settings, registry, metrics)
        self.tasks = [asyncio.create_task(r.run(), name=r.name) for r in self.runners]
        if settings.worker_metrics_port:
            serve_health(settings.worker_metrics_port, self.prom, "worker", self._readiness)
        self.tasks.append(asyncio.create_task(_refresh_loop(registry, self.stop_event)))
        self.tasks.append(asyncio.create_task(_trim_loop(self.stop_event)))
        for task in self.tasks:
            task.add_done_callback(self._on_task_done)
        log.info("worker started: %s", ", ".join(r.source_topic for r in self.runners))

    def _readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready once every stage has joined its group and restored its partitions."""
        stages = {r.name: {"assigned": r.ready.is_set(), "partitions": sorted(r.procs)} for r in self.runners}
        return bool(stages) and all(s["assigned"] for s in stages.values()), {"stages": stages}

    def _on_task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None and not self.stop_event.is_set():
            # a runner died (e.g. the broker refused us for good): crash so the supervisor restarts us
            asyncio.ensure_future(self.crash(task.exception()))  # type: ignore[arg-type]

    async def on_stop(self) -> None:
        self.stop_event.set()
        for r in self.runners:
            await r.stop()
        # a runner still connecting (Kafka down) must not hold the shutdown: give the others time to
        # checkpoint and commit, then cancel what is left
        if self.tasks:
            _, stuck = await asyncio.wait(self.tasks, timeout=15)
            for t in stuck:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)


def create_app(settings: Settings, prom: CollectorRegistry | None = None) -> faust.App:
    assert settings.kafka_bootstrap, "ARUS_KAFKA_BOOTSTRAP is not set"
    session_s = settings.worker_session_timeout_ms / 1000
    app = faust.App(
        f"{settings.topic_prefix}worker", broker=f"kafka://{settings.kafka_bootstrap}", web_enabled=False,
        autodiscover=False, topic_partitions=settings.partitions, stream_recovery_delay=0,
        broker_session_timeout=session_s, broker_heartbeat_interval=max(0.1, session_s / 6),
    )
    app.service(StreamHost(settings, prom or CollectorRegistry()))  # type: ignore[arg-type]  # instances are accepted
    return app


def run_worker(settings: Settings) -> None:
    fix_mmap_threshold()  # snapshot bursts must not ratchet RSS up (infra/memory.py)
    app = create_app(settings)
    faust.Worker(app, loglevel="info", quiet=True).execute_from_commandline()
