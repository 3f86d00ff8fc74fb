"""Every background service exposes /metrics, /healthz and /readyz on its metrics port, and the
metrics operators alert on are there (scraped over HTTP from the real processes)."""

from __future__ import annotations

import uuid

import httpx

from infra.embedded import free_port
from tests.helpers import publish_mqtt, wait_pipeline_ready, wait_until

EXPECTED = {
    "gateway": ["arus_gateway_mqtt_connected", "process_resident_memory_bytes"],
    "worker": ["arus_worker_events_in_total", "arus_worker_rejected_total", "arus_worker_event_age_seconds",
               "arus_worker_consumer_lag", "arus_worker_partitions", "arus_worker_checkpoint_seconds"],
    "sink": ["arus_sink_messages", "arus_sink_batch_rows", "arus_sink_flush_seconds", "arus_sink_consumer_lag"],
}


def _get(port: int, path: str) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)
    except httpx.HTTPError:
        return None


def test_services_are_ready_and_expose_their_metrics(arus_env, spawn_arus, fresh_database_url, mqtt_url):
    ports = {name: free_port() for name in EXPECTED}
    env = arus_env(database_url=fresh_database_url, ARUS_GATEWAY_CLIENT_ID=f"gw-{uuid.uuid4().hex[:8]}",
                   ARUS_WORKER_SESSION_TIMEOUT_MS="2000", ARUS_GATEWAY_METRICS_PORT=str(ports["gateway"]),
                   ARUS_WORKER_METRICS_PORT=str(ports["worker"]), ARUS_SINK_METRICS_PORT=str(ports["sink"]))
    procs = {name: spawn_arus(name, env=env) for name in EXPECTED}
    for name, port in ports.items():
        wait_until(lambda port=port: (r := _get(port, "/healthz")) is not None and r.status_code == 200, 60,
                   message=f"{name} /healthz")
        wait_until(lambda port=port: (r := _get(port, "/readyz")) is not None and r.status_code == 200, 90,
                   message=f"{name} /readyz")
        ready = _get(port, "/readyz")
        assert ready is not None and ready.json()["ready"] is True and ready.json()["service"] == name
    wait_pipeline_ready(env["ARUS_DATABASE_URL"], mqtt_url)
    publish_mqtt(mqtt_url, [("jember/v1/nobody/telemetry", b"{broken")])  # a rejection to count

    def scraped(name: str) -> str:
        r = _get(ports[name], "/metrics")
        return r.text if r is not None and r.status_code == 200 else ""

    for name, metrics in EXPECTED.items():
        wait_until(lambda name=name, metrics=metrics: all(m in scraped(name) for m in metrics), 60,
                   message=f"{name} exposes {metrics}")
    assert _get(ports["worker"], "/nope").status_code == 404
    for name, proc in procs.items():
        assert proc.alive(), f"{name} died:\n{proc.log_tail()}"
    # after SIGTERM the endpoint goes away with the process (graceful stop, exit code 0)
    assert procs["sink"].stop() == 0
    wait_until(lambda: _get(ports["sink"], "/healthz") is None, 30, message="sink endpoint closed")


def test_api_metrics_include_alerts_by_state_and_its_database_pool(arus_env, spawn_arus, fresh_database_url):
    import psycopg

    env = arus_env(database_url=fresh_database_url)
    with psycopg.connect(env["ARUS_DATABASE_URL"], autocommit=True) as conn:
        conn.execute("INSERT INTO alerts (id, rule_id, entity, severity, state, opened_at, updated_at)"
                     " VALUES ('r:e:1', 'r', 'e', 'major', 'open', now(), now())")
    spawn_arus("api", env=env)
    base = f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}"
    wait_until(lambda: httpx.get(f"{base}/healthz", timeout=2).status_code == 200, 30, message="api answers")

    def scraped() -> str:
        return httpx.get(f"{base}/metrics", timeout=5).text

    wait_until(lambda: 'arus_alerts{severity="major",state="open"} 1.0' in scraped(), 30, message="alerts by state")
    page = scraped()
    assert 'arus_api_db_pool_connections{what="pool_size"}' in page and "arus_api_requests_total" in page
