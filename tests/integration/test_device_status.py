"""Device status end to end: outside MQTT clients -> gateway -> worker -> sink -> devices table ->
GET /v1/devices; last will; silence; worker-side rejections answered on jember/v1/{id}/errors."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest
from fastapi.testclient import TestClient

from arus.api import create_app
from infra.devices import add_device
from infra.settings import Settings
from tests.helpers import pg_fetch, publish_mqtt, wait_pipeline_ready, wait_until

# water_level reports every 120 s, waste_container every 3600 s: with this factor a gauge is silent
# after 2.4 s and a bin after 72 s, so one test sees both a silent device and steady ones.
SILENCE_FACTOR = "0.02"


@pytest.fixture
def pipeline(arus_env, spawn_arus, fresh_database_url, mqtt_url):
    env = arus_env(database_url=fresh_database_url, ARUS_GATEWAY_CLIENT_ID=f"gw-{uuid.uuid4().hex[:8]}",
                   ARUS_WORKER_SESSION_TIMEOUT_MS="2000", ARUS_CHECKPOINT_INTERVAL_MS="300",
                   ARUS_DEVICE_SILENCE_FACTOR=SILENCE_FACTOR)
    procs = [spawn_arus(name, env=env) for name in ("gateway", "worker", "sink")]
    wait_pipeline_ready(env["ARUS_DATABASE_URL"], mqtt_url)
    yield env, procs
    for p in procs:
        assert p.alive(), f"{p.name} died:\n{p.log_tail()}"


class Listener:
    """An outside MQTT client subscribed to some topics, collecting what arrives."""

    def __init__(self, mqtt_url: str, topics: list[str], *, client_id: str | None = None,
                 will: tuple[str, str] | None = None) -> None:
        host, port = mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
        self.messages: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"l-{uuid.uuid4().hex[:8]}")
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect(host, int(port), keepalive=60)
        self.client.loop_start()
        if topics:
            self.client.subscribe([(t, 1) for t in topics])
            assert self.subscribed.wait(10), "subscription acknowledged"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = orjson.loads(msg.payload)
        except orjson.JSONDecodeError:
            body = msg.payload
        with self.lock:
            self.messages.append((msg.topic, body))

    def received(self) -> list[tuple[str, Any]]:
        with self.lock:
            return list(self.messages)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)

    def drop_connection(self) -> None:
        """Vanish without DISCONNECT (power cut): the broker publishes the last will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def device_row(dsn: str, device_id: str) -> tuple[Any, ...]:
    return pg_fetch(dsn, "SELECT status, status_reason, last_seen FROM devices WHERE device_id = %s", [device_id])[0]


def test_status_last_seen_silence_last_will_and_worker_errors(pipeline, mqtt_url, spawn_arus):
    env, procs = pipeline
    dsn = env["ARUS_DATABASE_URL"]
    suffix = uuid.uuid4().hex[:6]
    binx, will_dev, gauge = f"bin-{suffix}", f"binw-{suffix}", f"wl-{suffix}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        add_device(conn, binx, "waste_container", "35.09.19.1001")
        add_device(conn, will_dev, "waste_container", "35.09.19.1002")
        add_device(conn, gauge, "water_level", "35.09.01.2001")
    api = TestClient(create_app(Settings(database_url=dsn)))

    def listed(**params: str) -> dict[str, dict[str, Any]]:
        resp = api.get("/v1/devices", params=params)
        assert resp.status_code == 200, resp.text
        return {d["device_id"]: d for d in resp.json()["devices"]}

    assert listed()[binx]["status"] == "unknown"
    errors = Listener(mqtt_url, [f"jember/v1/{binx}/errors"])
    try:
        # 1. readings -> online; last_seen is the highest observation time even when an older one comes last
        now = datetime.now(UTC).replace(microsecond=0)
        newest, older, oldest = now - timedelta(seconds=5), now - timedelta(seconds=10), now - timedelta(seconds=60)
        topic = f"jember/v1/{binx}/telemetry"
        publish_mqtt(mqtt_url, [(topic, orjson.dumps({"ts": ms(older), "values": {"fillingLevel": 0.2}})),
                                (topic, orjson.dumps({"ts": newest.isoformat(), "values": {"fillingLevel": 0.3}}))])
        wait_until(lambda: binx in listed(status="online"), 60, message="the bin shows online")
        wait_until(lambda: device_row(dsn, binx)[2] == newest, 30, message="last_seen = newest observation")
        publish_mqtt(mqtt_url, [(topic, orjson.dumps({"ts": ms(oldest), "values": {"fillingLevel": 0.1}}))])
        wait_until(lambda: pg_fetch(dsn, "SELECT 1 FROM readings WHERE device_id = %s AND time = %s",
                                    [binx, oldest]), 60, message="the older reading lands")
        assert device_row(dsn, binx) == ("online", "reading", newest)
        shown = listed(region="35.09.19", kind="waste_container")[binx]
        assert shown["last_seen"] == newest.isoformat().replace("+00:00", "Z")
        assert shown["last_seen_wib"].endswith("WIB") and shown["status_reason"] == "reading"
        assert gauge not in listed(region="35.09.19")  # region prefix filter

        # 2. a worker-side rejection (unknown metric) is answered on the device's errors topic;
        # the gateway's own rejection (malformed JSON) is answered once, not again from the dlq
        publish_mqtt(mqtt_url, [(topic, b"{not json")])

        def answered() -> bool:
            replies = [b for _, b in errors.received() if isinstance(b, dict)]
            if any(r.get("reason") == "unknown_metric" for r in replies):
                return True
            bad = {"ts": int(time.time() * 1000), "values": {"foo": 1.0}}  # again, until the reply comes
            publish_mqtt(mqtt_url, [(topic, orjson.dumps(bad))])
            return False

        wait_until(answered, 60, interval=2.0, message="unknown_metric answered on the errors topic")
        reply = next(b for _, b in errors.received() if isinstance(b, dict) and b.get("reason") == "unknown_metric")
        assert reply["source"] == "worker" and "foo" in reply["message"] and reply["id"]
        assert reply["event_id"].startswith(f"{binx}/")
        assert [b.get("reason") for _, b in errors.received() if isinstance(b, dict)].count("malformed_json") == 1

        # 3. silence: the gauge sends once, then nothing for longer than 0.02 x 120 s
        g_time = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
        publish_mqtt(mqtt_url, [(f"jember/v1/{gauge}/telemetry",
                                 orjson.dumps({"ts": g_time.isoformat(), "values": {"waterLevel": 1.0}}))])
        wait_until(lambda: device_row(dsn, gauge)[:2] == ("offline", "silent"), 60, message="the gauge goes silent")
        assert device_row(dsn, gauge)[2] == g_time
        assert gauge in listed(status="offline")

        # 4. last will: the device says online (retained), sends, then vanishes; the broker's will
        # makes it offline at once; a new reading makes it online again
        device = Listener(mqtt_url, [], client_id=will_dev, will=(f"jember/v1/{will_dev}/status", "offline"))
        device.publish(f"jember/v1/{will_dev}/status", "online", retain=True)
        device.publish(f"jember/v1/{will_dev}/telemetry",
                       orjson.dumps({"ts": int(time.time() * 1000), "values": {"fillingLevel": 0.5}}))
        wait_until(lambda: device_row(dsn, will_dev)[0] == "online", 60, message="the device is online")
        device.drop_connection()
        wait_until(lambda: device_row(dsn, will_dev)[:2] == ("offline", "status_message"), 60,
                   message="the last will makes it offline")
        assert listed(status="offline")[will_dev]["status_reason"] == "status_message"
        publish_mqtt(mqtt_url, [(f"jember/v1/{will_dev}/telemetry",
                                 orjson.dumps({"ts": int(time.time() * 1000), "values": {"fillingLevel": 0.6}}))])
        wait_until(lambda: device_row(dsn, will_dev)[:2] == ("online", "reading"), 60,
                   message="a new reading makes it online again")

        # 5. a restarted gateway re-subscribes and gets the retained `offline` (the old will) again:
        # of unknown age, it must not make the device offline
        assert procs[0].stop() == 0
        procs[0] = spawn_arus("gateway", env=env)
        will_errors = Listener(mqtt_url, [f"jember/v1/{will_dev}/errors"])
        try:
            def marker_answered() -> bool:  # same partition as the retained status, so processed after it
                if any(isinstance(b, dict) and b.get("reason") == "unknown_metric" for _, b in will_errors.received()):
                    return True
                publish_mqtt(mqtt_url, [(f"jember/v1/{will_dev}/telemetry", orjson.dumps(
                    {"ts": int(time.time() * 1000), "values": {"marker": 1.0}}))])
                return False

            wait_until(marker_answered, 60, interval=2.0, message="the restarted gateway answers")
        finally:
            will_errors.close()
        wait_until(lambda: pg_fetch(dsn, "SELECT 1 FROM dead_letters WHERE device_id = %s AND reason = %s",
                                    [will_dev, "unknown_metric"]), 30, message="the marker is stored")
        assert device_row(dsn, will_dev)[:2] == ("online", "reading")
        cleaner = Listener(mqtt_url, [])  # clear the retained status: the broker is shared by the session
        cleaner.publish(f"jember/v1/{will_dev}/status", b"", retain=True)
        cleaner.close()
    finally:
        errors.close()


def test_sink_statements_keep_the_newest_status_and_observation(fresh_database_url):
    from consumers.device_status_rows import convert

    dsn = fresh_database_url
    with psycopg.connect(dsn, autocommit=True) as conn:
        add_device(conn, "wl-order", "water_level", "35.09.01.2001")

    def apply(**msg: Any) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for stmt, params in convert({"device_id": "wl-order", **msg}):
                conn.execute(stmt, params)

    t = 1_790_000_040_000
    apply(status="online", reason="reading", time=t, last_seen=t - 100)
    apply(status="offline", reason="silent", time=t + 5000, last_seen=t - 100)
    apply(status="online", reason="reading", time=t + 1000, last_seen=t - 50)  # redelivered, older
    row = pg_fetch(dsn, "SELECT status, status_reason, status_time, last_seen FROM devices"
                        " WHERE device_id = 'wl-order'")[0]
    start = datetime.fromtimestamp(t / 1000, UTC)
    # the older transition does not override the status; its observation still counts for last_seen
    assert row == ("offline", "silent", start + timedelta(seconds=5), start - timedelta(milliseconds=50))
    apply(status="offline", reason="silent", time=t + 5000, last_seen=t - 100)  # exact replay: no change
    assert pg_fetch(dsn, "SELECT status, status_reason, status_time, last_seen FROM devices"
                         " WHERE device_id = 'wl-order'")[0] == row
