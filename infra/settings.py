"""The one place the environment is read. Every service builds a frozen Settings at start."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARUS_", frozen=True, extra="ignore")

    # Where the real components are. Unset -> `arus up` starts an embedded one.
    kafka_bootstrap: str | None = None
    database_url: SecretStr | None = None
    mqtt_url: str | None = None  # mqtt://user:pass@host:port

    http_port: int = 8080
    data_dir: Path = Path(".arus")
    rules_file: Path | None = None

    topic_prefix: str = "jember."
    partitions: int = Field(4, ge=1, le=256)

    # Event-time policy
    window_seconds: int = Field(60, ge=1)
    allowed_lateness_s: int = Field(600, ge=0, description="a reading this late still corrects its window")
    max_age_s: int = Field(7 * 24 * 3600, description="older readings are rejected as too_old")
    max_future_s: int = Field(300, description="readings further ahead than this are rejected")
    max_payload_bytes: int = Field(64 * 1024, ge=256)
    # Device status: silent longer than this factor x its kind's expected interval -> offline
    device_silence_factor: float = Field(3.0, gt=0)

    # Hot path tuning
    batch_max: int = Field(5000, ge=1)
    batch_linger_ms: int = Field(20, ge=0)
    checkpoint_interval_ms: int = Field(1000, ge=50)
    # Consumers' fetch long-poll bound (fetch.max.wait.ms), adapted per consumer between the floor and
    # the ceiling (infra/fetch_wait.py): Tansu, the embedded broker, holds a fetch this long even when
    # records arrive meanwhile (latency per hop), and answers nothing when it cannot collect records
    # in time, which its growing in-memory partitions make slower. A starved consumer doubles its wait.
    kafka_fetch_max_wait_ms: int = Field(20, ge=1, le=5000)
    kafka_fetch_max_wait_ceiling_ms: int = Field(1000, ge=1, le=10000)
    # every Nth checkpoint of a partition is a full snapshot (a restore reads from the last one on)
    checkpoint_full_every: int = Field(300, ge=1)
    # A changing 1-minute window's running state goes to jember.aggregates at most this often (its
    # final state always goes out when it closes)
    aggregate_emit_interval_ms: int = Field(5000, ge=0)

    # Personal data: key of the keyed hash (HMAC) that replaces NIK/names at ingest
    pii_key: SecretStr = SecretStr("change-me-in-production")

    # MQTT gateway: a fixed client id keeps its persistent session (unacked messages survive a
    # restart); run several with distinct ids and `gateway_shared` ($share/arus/..., mosquitto only).
    gateway_client_id: str = Field("arus-gateway", min_length=1, max_length=64)
    gateway_shared: bool = False
    gateway_metrics_port: int | None = None
    # worker-side rejections answered on jember/v1/{id}/errors: at most this many a minute per device
    gateway_error_replies_per_min: int = Field(60, ge=0)
    # paho's network thread holds the GIL while parsing; a short switch interval hands messages to the
    # asyncio thread sooner (measured: the default 5 ms adds milliseconds of latency per hand-over)
    gateway_switch_interval_s: float = Field(0.0005, gt=0, le=0.1)

    # Sink (Kafka -> PostgreSQL): flush when this many rows are buffered or the oldest is this old.
    sink_flush_rows: int = Field(50_000, ge=1)
    # devices.last_seen is written at most this often per device (always the highest observation time)
    sink_last_seen_interval_s: float = Field(5.0, ge=0)
    sink_flush_ms: int = Field(100, ge=1)
    # A large flush's readings are COPYed over this many connections at once (split by device; one
    # PostgreSQL backend COPYs into the indexed readings table at ~190k rows/s on one core)
    sink_copy_connections: int = Field(2, ge=1, le=8)
    sink_copy_parallel_min_rows: int = Field(10_000, ge=1)  # smaller flushes use one connection
    # Tansu answers a JoinGroup after about half the session timeout (measured: 5 s with the
    # default 10 s, 1 s with 2 s), so a short session makes sink start and failover fast.
    sink_session_timeout_ms: int = Field(2000, ge=500)
    sink_heartbeat_interval_ms: int = Field(500, ge=50)
    sink_metrics_port: int | None = None

    consumer_group_prefix: str = "arus"
    worker_metrics_port: int | None = None
    # Tansu answers a JoinGroup after about half the session timeout; the worker's event loop may
    # block for a full snapshot of a large state, so its session is longer than the sink's.
    worker_session_timeout_ms: int = Field(6000, ge=1000)
    region_retention_s: int = Field(3600, description="a merged kecamatan window is dropped once every ingest "
                                    "partition checkpointed past it, or at most this long past its end + lateness")
    # Program indicators (docs/indicators.md): catalogue file (default: the shipped example), k of the
    # small-cell suppression, how long past its period end a cell still takes late events, and how
    # long an idle open entity (case, complaint, ...) is remembered by the indicator stage.
    indicator_catalogue_file: Path | None = None
    indicator_min_persons: int = Field(5, ge=1)
    indicator_lateness_s: int = Field(8 * 86400, ge=0)
    indicator_entity_retention_s: int = Field(90 * 86400, ge=0)
    log_json: bool = False

    # Alerts over HTTP (arus/routes/alerts.py): SSE heartbeat, and an optional outbound webhook that
    # gets every alert event (POST JSON); after `alert_webhook_attempts` failures -> dead letter.
    sse_heartbeat_s: float = Field(15.0, gt=0)
    alert_webhook_url: str | None = None
    alert_webhook_attempts: int = Field(5, ge=1)
    alert_webhook_backoff_s: float = Field(0.5, ge=0)
    alert_webhook_timeout_s: float = Field(5.0, gt=0)

    # Storage (consumers/rollups.py, 005_rollups*.sql): the plain-PostgreSQL rollup job runs inside
    # `arus sink` every rollup_interval_s; retention in days per table (None keeps forever), applied
    # by a delete job on plain PostgreSQL and as TimescaleDB retention policies; compression after
    # compress_after_days (TimescaleDB only). Series API limits (arus/routes/series.py).
    rollup_interval_s: float = Field(60.0, gt=0)
    retention_interval_s: float = Field(3600.0, gt=0)
    retention_readings_days: int | None = Field(400, ge=1)
    retention_aggregates_days: int | None = Field(5 * 365, ge=1)
    retention_rollup_hourly_days: int | None = Field(5 * 365, ge=1)
    retention_rollup_daily_days: int | None = Field(None, ge=1)
    compress_after_days: int = Field(7, ge=1)
    series_max_points: int = Field(10_000, ge=1)
    series_raw_max_days: int = Field(7, ge=1, description="longest range answered from raw readings (p95)")
    series_statement_timeout_ms: int = Field(15_000, ge=100)

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def database_dsn(self) -> str:
        if self.database_url is None:
            raise ValueError("ARUS_DATABASE_URL is not set")
        return self.database_url.get_secret_value()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
