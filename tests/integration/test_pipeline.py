"""The walking skeleton end to end: an outside MQTT client -> gateway -> Kafka -> worker -> sink ->
PostgreSQL, every component a real process on real services."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import psycopg
import pytest

from infra.devices import add_device
from tests.helpers import pg_fetch, pg_scalar, publish_mqtt, wait_pipeline_ready, wait_until


@pytest.fixture
def pipeline(arus_env, spawn_arus, fresh_database_url, mqtt_url):
    env = arus_env(database_url=fresh_database_url, ARUS_GATEWAY_CLIENT_ID=f"gw-{uuid.uuid4().hex[:8]}",
                   ARUS_WORKER_SESSION_TIMEOUT_MS="2000", ARUS_CHECKPOINT_INTERVAL_MS="300")
    procs = [spawn_arus(name, env=env) for name in ("gateway", "worker", "sink")]
    wait_pipeline_ready(env["ARUS_DATABASE_URL"], mqtt_url)
    yield env, procs
    for p in procs:
        assert p.alive(), f"{p.name} died:\n{p.log_tail()}"


def test_telemetry_lands_once_with_aggregates_and_bad_input_is_dead_lettered(pipeline, mqtt_url):
    env, _ = pipeline
    dsn = env["ARUS_DATABASE_URL"]
    suffix = uuid.uuid4().hex[:6]
    gauge, air = f"wl-{suffix}", f"aq-{suffix}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        add_device(conn, gauge, "water_level", "35.09.19.1001")  # Kaliwates
        add_device(conn, air, "air_quality", "35.09.19.1002")  # Kaliwates too
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    wib = now.astimezone(__import__("zoneinfo").ZoneInfo("Asia/Jakarta"))
    good = [
        (f"jember/v1/{gauge}/telemetry", orjson.dumps({"ts": wib.isoformat(), "seq": 1, "values": {"waterLevel": 1.25}})),
        (f"jember/v1/{gauge}/telemetry", orjson.dumps({"ts": int((now + timedelta(seconds=1)).timestamp() * 1000),
                                                       "seq": 2, "values": {"waterLevel": 1.75}})),
        (f"jember/v1/{air}/telemetry", orjson.dumps([
            {"ts": now.isoformat(), "values": {"pm25": 40.0, "pm10": 80.0}},
            {"ts": (now + timedelta(seconds=2)).isoformat(), "values": {"pm25": 20.0, "pm10": 60.0}},
        ])),
    ]
    bad = [
        (f"jember/v1/{gauge}/telemetry", b"{not json"),
        (f"jember/v1/{gauge}/telemetry", orjson.dumps({"ts": now.isoformat(), "values": {"waterLevel": 99.0}})),
        (f"jember/v1/unregistered-{suffix}/telemetry", orjson.dumps({"ts": now.isoformat(), "values": {"waterLevel": 1.0}})),
    ]
    publish_mqtt(mqtt_url, good + bad)

    expected = {(gauge, "waterLevel", 1.25), (gauge, "waterLevel", 1.75), (air, "pm25", 40.0), (air, "pm10", 80.0),
                (air, "pm25", 20.0), (air, "pm10", 60.0)}

    def readings():
        return set(pg_fetch(dsn, "SELECT device_id, metric, value FROM readings WHERE device_id = ANY(%s)",
                            [[gauge, air]]))

    assert wait_until(lambda: readings() == expected, 90, message="all six readings land")
    row = pg_fetch(dsn, "SELECT time, region_code FROM readings WHERE device_id = %s AND value = 1.25", [gauge])[0]
    assert row[0] == now and row[1] == "35.09.19.1001"

    def dead_letters():
        return {r[0] for r in pg_fetch(dsn, "SELECT reason FROM dead_letters")}

    wait_until(lambda: {"malformed_json", "out_of_range", "unknown_device"} <= dead_letters(), 60,
               message="each bad payload is dead-lettered with its reason")

    # the same telemetry again (an outside client retrying): nothing changes
    publish_mqtt(mqtt_url, good)
    marker = (f"jember/v1/{gauge}/telemetry",
              orjson.dumps({"ts": (now + timedelta(seconds=5)).isoformat(), "values": {"waterLevel": 2.0}}))
    publish_mqtt(mqtt_url, [marker])  # valid traffic keeps flowing after the bad input
    wait_until(lambda: (gauge, "waterLevel", 2.0) in readings(), 60, message="traffic after the repeat lands")
    assert pg_scalar(dsn, "SELECT count(*) FROM readings WHERE device_id = ANY(%s)", [[gauge, air]]) == 7
    wait_until(lambda: pg_scalar(dsn, "SELECT count(*) FROM dead_letters WHERE reason = 'duplicate'") >= 1, 60,
               message="the repeat is recorded as a duplicate")

    # 1-minute aggregates per device and per kecamatan, equal to SQL over the readings
    bucket = now.replace(second=0)

    def device_agg():
        return pg_fetch(dsn, "SELECT count, min, max, last FROM aggregates WHERE scope = 'device' AND key = %s"
                             " AND metric = 'waterLevel' AND bucket = %s", [gauge, bucket])

    in_bucket = [v for t, v in [(now, 1.25), (now + timedelta(seconds=1), 1.75), (now + timedelta(seconds=5), 2.0)]
                 if t.replace(second=0) == bucket]
    wait_until(lambda: device_agg() == [(len(in_bucket), min(in_bucket), max(in_bucket), in_bucket[-1])], 60,
               message="device aggregate equals its readings")

    def kecamatan_pm25():
        return pg_fetch(dsn, "SELECT count, min, max FROM aggregates WHERE scope = 'kecamatan' AND key = '35.09.19'"
                             " AND metric = 'pm25' ORDER BY bucket")

    sql_truth = pg_fetch(dsn, "SELECT count(*), min(value), max(value) FROM readings WHERE region_code LIKE '35.09.19%%'"
                              " AND metric = 'pm25' GROUP BY date_bin('1 minute', time, 'epoch') ORDER BY 1")
    wait_until(lambda: sorted(kecamatan_pm25()) == sorted(sql_truth), 60, message="kecamatan aggregate equals SQL")
    assert time.time()  # keep the fixture's liveness check meaningful
