"""`arus up` with ARUS_DATABASE_URL / ARUS_MQTT_URL / ARUS_KAFKA_BOOTSTRAP naming running services uses
them (starts no embedded one), works end to end through them, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import signal
import sys
import time
import uuid
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import psutil

from infra import embedded
from tests.helpers import pg_scalar, wait_until

ROOT = Path(__file__).resolve().parents[2]


def test_up_uses_the_services_it_is_given(arus_env, fresh_database_url, mqtt_url, tmp_path):
    env = arus_env(database_url=fresh_database_url)
    env["ARUS_DATA_DIR"] = str(tmp_path / "data")
    log = tmp_path / "up.log"
    proc = embedded.popen_in_group([sys.executable, "-m", "arus.cli", "up"], log, env=env, cwd=ROOT,
                                   deathsig=signal.SIGKILL)
    try:
        wait_until(lambda: "Ctrl-C stops everything" in log.read_text() or proc.poll() is not None, 120,
                   message="arus up printed its table")
        text = log.read_text()
        assert proc.poll() is None, text
        assert "started postgres" not in text and "started mosquitto" not in text and "started amqtt" not in text
        assert "started tansu" not in text
        names = {p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
        assert not names & {"postgres", "mosquitto", "tansu"}, names

        host, port = mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
        probe = f"probe-{uuid.uuid4().hex[:6]}"

        def answered() -> bool:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"outside-{uuid.uuid4().hex[:6]}")
            client.connect(host, int(port))
            client.loop_start()
            info = client.publish(f"jember/v1/{probe}/telemetry",
                                  orjson.dumps({"ts": int(time.time() * 1000), "values": {"waterLevel": 1}}), qos=1)
            info.wait_for_publish(timeout=5)
            client.loop_stop()
            client.disconnect()
            return bool(pg_scalar(fresh_database_url, "SELECT count(*) FROM dead_letters WHERE device_id = %s",
                                  [probe]))

        wait_until(answered, 120, interval=0.5, message="the stack answers through the given services")
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    wait_until(lambda: not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], 30,
               message="no process left after Ctrl-C")
