"""The MQTT broker and the gateway restart, one after the other, while devices keep publishing QoS 1:
the gateway's persistent session keeps what arrives while it is down, the broker keeps that session
and its queue across a graceful restart, and every acknowledged message ends in the database once.

Limit (documented in docs/reliability.md): mosquitto writes its persistence file on a graceful stop
and every `autosave_interval` seconds; a broker SIGKILLed between two saves loses the messages it had
queued since the last save (the publishers already have their PUBACK). amqtt keeps nothing."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from infra import embedded
from infra.devices import add_device
from tests.helpers import pg_scalar, wait_pipeline_ready, wait_until

N = 300  # per phase


T0 = int(time.time() * 1000) - 3 * N * 1000  # one reading per second of event time, ending now


def _publish(port: int, device: str, first_seq: int, n: int) -> None:
    """QoS 1 from an outside client; returns once the broker acknowledged every message."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:6]}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = []
        for seq in range(first_seq, first_seq + n):
            body = orjson.dumps({"ts": T0 + seq * 1000, "seq": seq, "values": {"waterLevel": 1.0}})
            infos.append(client.publish(f"jember/v1/{device}/telemetry", body, qos=1))
        for info in infos:
            info.wait_for_publish(timeout=30)
            assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()


@pytest.mark.skipif(embedded.mqtt_backend() != "mosquitto", reason="amqtt keeps no sessions across a restart")
def test_broker_and_gateway_restarts_lose_nothing(arus_env, spawn_arus, fresh_database_url, tmp_path: Path) -> None:
    port = embedded.free_port()
    broker = embedded.start_mqtt(port, tmp_path / "broker")
    url = f"mqtt://127.0.0.1:{port}"
    env = arus_env(database_url=fresh_database_url, ARUS_MQTT_URL=url,
                   ARUS_GATEWAY_CLIENT_ID=f"gw-{uuid.uuid4().hex[:8]}", ARUS_WORKER_SESSION_TIMEOUT_MS="2000",
                   ARUS_ALLOWED_LATENESS_S="3600")
    dsn = env["ARUS_DATABASE_URL"]
    device = f"wl-restart-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        add_device(conn, device, "water_level", "35.09.19.1001")
    count = "SELECT count(*) FROM readings WHERE device_id = %s"
    try:
        gateway = spawn_arus("gateway", env=env, name="gateway-1")
        spawn_arus("worker", env=env)
        spawn_arus("sink", env=env)
        wait_pipeline_ready(dsn, url)  # the gateway's session exists (subscribed) from here on
        _publish(port, device, 0, N)
        wait_until(lambda: pg_scalar(dsn, count, [device]) == N, 120, message="phase 1 lands")

        # the gateway goes down; devices keep publishing; the broker queues for its persistent session
        assert gateway.stop() == 0
        _publish(port, device, N, N)
        # the broker restarts gracefully (persistence written), then the gateway comes back
        broker.stop()
        broker = embedded.start_mqtt(port, tmp_path / "broker")
        gateway = spawn_arus("gateway", env=env, name="gateway-2")
        wait_until(lambda: pg_scalar(dsn, count, [device]) == 2 * N, 120,
                   message="what was queued while the gateway and the broker were down lands")

        # and a gateway crash (SIGKILL) right after a burst, messages still in flight: redelivered once
        _publish(port, device, 2 * N, N)
        gateway.kill()
        spawn_arus("gateway", env=env, name="gateway-3")
        wait_until(lambda: pg_scalar(dsn, count, [device]) == 3 * N, 120, message="phase 3 lands")
        assert pg_scalar(dsn, "SELECT count(DISTINCT time) FROM readings WHERE device_id = %s", [device]) == 3 * N
    finally:
        broker.stop()
