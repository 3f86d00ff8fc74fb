"""Device credentials enforced by the broker, end to end: an MQTT broker with the password file and
ACL generated from the registry (kept current by the registry watcher), a gateway with its own
account, worker and sink; devices connect from outside with paho.

Refused things must produce nothing downstream. A broker may PUBACK a publish its ACL drops, so
absence is checked behind a barrier: the topics have ONE partition, so a valid reading published
after the refused ones lands only after anything they could have caused.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psycopg
import pytest

from infra import embedded, mqtt_auth
from infra.devices import add_device, revoke_device, rotate_secret
from tests.helpers import pg_fetch, wait_until

REGION = "35.09.19.1001"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class AuthStack:
    port: int
    dsn: str
    service: embedded.EmbeddedService
    sync: mqtt_auth.AuthSync
    gateway_url: str


def _backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.param == "amqtt":
        monkeypatch.setattr(embedded, "_mosquitto_bin", lambda: None)  # as on a machine without it
    elif embedded.mqtt_backend() != "mosquitto":
        pytest.skip("mosquitto is not installed")


@pytest.fixture(params=["mosquitto", "amqtt"])
def auth_stack(request, monkeypatch, tmp_path: Path, fresh_database_url: str) -> Iterator[AuthStack]:
    """A broker with auth on a random port, and the registry watcher (as `arus up` runs it)."""
    _backend(request, monkeypatch)
    secret = mqtt_auth.load_or_create_secret(tmp_path / "gateway.secret")
    holder: dict[str, embedded.EmbeddedService] = {}
    sync = mqtt_auth.AuthSync(tmp_path / "auth", [mqtt_auth.gateway_account("arus-gateway", secret)],
                              reload=lambda: embedded.reload_mqtt(holder["svc"]) if "svc" in holder else None)
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        sync.sync(conn, force=True)
    svc = embedded.start_mqtt(embedded.free_port(), tmp_path / "broker", tmp_path / "auth" / "passwd",
                              tmp_path / "auth" / "acl")
    assert svc.name == request.param
    holder["svc"] = svc
    stop = threading.Event()
    watcher = threading.Thread(target=mqtt_auth.watch, args=(fresh_database_url, sync),
                               kwargs={"interval": 0.2, "stop": stop.is_set, "sleep": stop.wait}, daemon=True)
    watcher.start()
    try:
        yield AuthStack(svc.port, fresh_database_url, svc, sync,
                        mqtt_auth.with_credentials(svc.url, "arus-gateway", secret))
    finally:
        stop.set()
        watcher.join(timeout=10)
        svc.stop()


class Device:
    """A paho client that remembers how its CONNECT was answered."""

    def __init__(self, port: int, username: str | None, password: str | None) -> None:
        self.rc: Any = None
        self.answered = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:10]}")
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(30, 60)  # no quick retries with refused credentials
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.answered.wait(10), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if self.rc is None:
            self.rc = reason
        self.answered.set()

    @property
    def accepted(self) -> bool:
        return self.rc is not None and not self.rc.is_failure

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        if self.client.is_connected():
            info.wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def accepts(port: int, username: str | None, password: str | None) -> bool:
    d = Device(port, username, password)
    d.close()
    return d.accepted


def reading(value: float, seq: int = 0) -> bytes:
    return orjson.dumps({"ts": int(time.time() * 1000), "seq": seq, "values": {"waterLevel": value}})


def test_only_registered_devices_publish_and_only_under_their_own_topic(
    auth_stack: AuthStack, arus_env, spawn_arus
) -> None:
    s = auth_stack
    dsn = s.dsn
    suffix = uuid.uuid4().hex[:6]
    a, b, c = f"wl-a-{suffix}", f"wl-b-{suffix}", f"wl-c-{suffix}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        secret_a = add_device(conn, a, "water_level", REGION)
        secret_b = add_device(conn, b, "water_level", REGION)
        secret_c = add_device(conn, c, "water_level", REGION)
    # The watcher regenerates and reloads: the new devices are let in (no restart of the broker).
    wait_until(lambda: accepts(s.port, c, secret_c), 20, message="a newly added device is accepted")
    assert s.service.alive()

    env = arus_env(database_url=dsn, partitions=1, ARUS_MQTT_URL=s.gateway_url,
                   ARUS_GATEWAY_CLIENT_ID=f"gw-{suffix}")
    procs = [spawn_arus(name, env=env) for name in ("gateway", "worker", "sink")]

    def values(device: str) -> set[float]:
        return {r[0] for r in pg_fetch(dsn, "SELECT value FROM readings WHERE device_id = %s", [device])}

    # A registered device's reading lands (retried until the pipeline is up: the worker joins late).
    dev_a = Device(s.port, a, secret_a)
    assert dev_a.accepted
    seq = 0

    def lands() -> bool:
        nonlocal seq
        seq += 1
        dev_a.publish(f"jember/v1/{a}/telemetry", reading(1.0 + seq / 1000, seq))
        return bool(values(a))

    wait_until(lands, 120, interval=1.0, message="a registered device's reading lands in readings")

    # Refused at CONNECT: a wrong secret, no credentials at all, an unknown user.
    for user, password in ((a, "not-the-secret"), (None, None), (f"ghost-{suffix}", secret_a), (b, secret_a)):
        d = Device(s.port, user, password)
        assert not d.accepted, f"{user!r} was let in"
        d.publish(f"jember/v1/{user or 'anon'}/telemetry", reading(2.22))
        d.close()

    # Into another device's topic: the broker may acknowledge it, but it goes nowhere.
    dev_a.publish(f"jember/v1/{b}/telemetry", reading(3.33))
    dev_a.publish(f"jember/v1/{b}/status", b"offline")

    # Revoked while connected, then publishing: nothing passes.
    dev_b = Device(s.port, b, secret_b)
    assert dev_b.accepted
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert revoke_device(conn, b)
    wait_until(lambda: not accepts(s.port, b, secret_b), 20, message="the revoked device is refused")
    dev_b.publish(f"jember/v1/{b}/telemetry", reading(4.44))

    # Rotation: the old secret stops working, the new one works.
    with psycopg.connect(dsn, autocommit=True) as conn:
        new_a = rotate_secret(conn, a)
    wait_until(lambda: not accepts(s.port, a, secret_a), 20, message="the old secret is refused after rotation")
    assert accepts(s.port, a, new_a)

    # The barrier: a valid reading after all of the above (one partition end to end).
    dev_a.close()
    dev_a2 = Device(s.port, a, new_a)
    assert dev_a2.accepted
    dev_a2.publish(f"jember/v1/{a}/telemetry", reading(5.55, 10_000))
    wait_until(lambda: 5.55 in values(a), 60, message="the reading after the refused ones lands")
    dev_a2.close()
    dev_b.close()

    assert values(b) == set()
    assert not values(a) & {2.22, 3.33, 4.44}
    raws = [r[0] for r in pg_fetch(dsn, "SELECT raw FROM dead_letters")]
    assert not [r for r in raws if any(x in r for x in ("2.22", "3.33", "4.44"))], raws
    assert not pg_fetch(dsn, "SELECT 1 FROM dead_letters WHERE device_id = %s OR device_id LIKE %s",
                        [b, f"ghost-{suffix}%"])
    for p in procs:
        assert p.alive(), f"{p.name} died:\n{p.log_tail()}"
    assert s.service.alive()


# --------------------------------------------------------------------------- the supervisor and the CLI


def _run_arus(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "arus.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_arus_up_enforces_credentials_and_follows_the_registry() -> None:
    """`arus up --simulate`: its own broker refuses anonymous clients, the simulated devices publish
    with their own logins, and a device added with `arus devices add` is let in without a restart."""
    base = Path(tempfile.mkdtemp(prefix="arus-auth-up-"))
    os.chmod(base, 0o755)  # the unprivileged PostgreSQL user must reach its data dir
    ports = {k: embedded.free_port() for k in ("pg", "kafka", "mqtt", "http")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARUS_")}
    env.update({
        "ARUS_DATA_DIR": str(base / "data"),
        "ARUS_HTTP_PORT": str(ports["http"]),
        "ARUS_DATABASE_URL": f"postgresql://arus@127.0.0.1:{ports['pg']}/arus",
        "ARUS_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['kafka']}",
        "ARUS_MQTT_URL": f"mqtt://127.0.0.1:{ports['mqtt']}",
        "ARUS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        "PYTHONUNBUFFERED": "1",
    })
    log = base / "up.log"
    proc = embedded.popen_in_group([sys.executable, "-m", "arus.cli", "up", "--simulate", "--rate", "20"], log,
                                   env=env, cwd=ROOT, deathsig=signal.SIGKILL)
    dsn = env["ARUS_DATABASE_URL"]
    try:
        wait_until(lambda: "Ctrl-C stops everything" in log.read_text() or proc.poll() is not None, 120,
                   message="arus up printed its table")
        assert proc.poll() is None, log.read_text()
        assert "anonymous refused" in log.read_text()
        secret_file = base / "data" / "mqtt" / "gateway.secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        assert embedded.mqtt_connack("127.0.0.1", ports["mqtt"]) == 5  # anonymous: not authorised
        # The simulated devices' readings land: each logged in as itself.
        wait_until(lambda: (pg_fetch(dsn, "SELECT count(DISTINCT device_id) FROM readings")[0][0] or 0) >= 10,
                   120, interval=0.5, message="simulated devices' readings land")
        # A device registered while the stack runs is let in, and its reading lands.
        device = f"wl-up-{uuid.uuid4().hex[:6]}"
        secret = _run_arus(env, "devices", "add", device, "--kind", "water_level",
                           "--region", REGION).strip().splitlines()[-1]
        wait_until(lambda: accepts(ports["mqtt"], device, secret), 20, message="the new device is let in")
        d = Device(ports["mqtt"], device, secret)
        d.publish(f"jember/v1/{device}/telemetry", reading(1.5))
        d.close()
        wait_until(lambda: pg_fetch(dsn, "SELECT value FROM readings WHERE device_id = %s", [device]) == [(1.5,)],
                   60, message="the new device's reading lands")
        _run_arus(env, "devices", "revoke", device)
        wait_until(lambda: not accepts(ports["mqtt"], device, secret), 20, message="revoked: refused")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            embedded.stop_process(proc, timeout=5)
            shutil.rmtree(base, ignore_errors=True)


def test_mqtt_auth_command_writes_the_files_and_reloads_the_broker(fresh_database_url, tmp_path) -> None:
    """`arus mqtt-auth --watch --pid-file`: what the docker-compose sidecar runs, against mosquitto
    (or amqtt) started on the files it wrote."""
    auth = tmp_path / "auth"
    secret = "gw-" + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARUS_")}
    env.update({"ARUS_DATABASE_URL": fresh_database_url, "PYTHONUNBUFFERED": "1",
                "ARUS_MQTT_URL": f"mqtt://arus-gateway:{secret}@127.0.0.1:1883"})
    first = _run_arus(env, "mqtt-auth", "--out", str(auth))
    assert "0 device(s), 1 account(s)" in first
    assert (auth / "passwd").stat().st_mode & 0o777 == 0o600
    svc = embedded.start_mqtt(embedded.free_port(), tmp_path / "broker", auth / "passwd", auth / "acl")
    (tmp_path / "broker.pid").write_text(f"{svc.pid}\n")
    watcher = embedded.popen_in_group(
        [sys.executable, "-m", "arus.cli", "mqtt-auth", "--out", str(auth), "--watch", "--interval", "0.3",
         "--pid-file", str(tmp_path / "broker.pid")], tmp_path / "watch.log", env=env, cwd=ROOT)
    try:
        assert accepts(svc.port, "arus-gateway", secret)
        device = f"wl-cli-{uuid.uuid4().hex[:6]}"
        with psycopg.connect(fresh_database_url, autocommit=True) as conn:
            device_secret = add_device(conn, device, "water_level", REGION)
        wait_until(lambda: accepts(svc.port, device, device_secret), 20,
                   message=f"the watcher let the new device in:\n{(tmp_path / 'watch.log').read_text()}")
        assert "SIGHUP sent to" in (tmp_path / "watch.log").read_text()
        assert svc.alive() and watcher.poll() is None
    finally:
        embedded.stop_process(watcher, timeout=5)
        svc.stop()


def test_simulator_credentials_never_lock_out_a_device_it_does_not_own(fresh_database_url, tmp_path) -> None:
    from infra.devices import verify_secret
    from producers.simulator import issue_credentials, plan_devices

    devices = plan_devices(1)  # one river gauge per kecamatan
    theirs, legacy, revoked = devices[0].device_id, devices[1].device_id, devices[2].device_id
    with psycopg.connect(fresh_database_url, autocommit=True) as conn:
        real_secret = add_device(conn, theirs, "water_level", devices[0].region_code)  # a real device
        add_device(conn, legacy, "water_level", devices[1].region_code)
        conn.execute("UPDATE devices SET secret_hash = 'pbkdf2_sha256$1$00$00' WHERE device_id = %s", [legacy])
        add_device(conn, revoked, "water_level", devices[2].region_code)
        revoke_device(conn, revoked)
    store = tmp_path / "data" / "simulator" / "credentials.json"

    def hashes() -> dict[str, str]:
        return dict(pg_fetch(fresh_database_url, "SELECT device_id, secret_hash FROM devices"))

    secrets, added = issue_credentials(fresh_database_url, devices, store)
    assert added == len(devices) - 3
    assert theirs not in secrets and revoked not in secrets  # never rotated, never used
    assert verify_secret(real_secret, hashes()[theirs])
    assert mqtt_auth.is_broker_hash(hashes()[legacy]) and verify_secret(secrets[legacy], hashes()[legacy])
    assert all(verify_secret(secrets[d], hashes()[d]) for d in secrets)
    assert store.stat().st_mode & 0o777 == 0o600
    before = hashes()
    again, added_again = issue_credentials(fresh_database_url, devices, store)
    assert (again, added_again) == (secrets, 0) and hashes() == before  # a re-run changes nothing
