"""The embedded services for real: start each, talk its protocol, stop it, and leave no process.

Also the `arus up` supervisor: it starts what is missing, and leaves nothing behind when stopped
(SIGTERM) or killed (SIGKILL).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from infra import embedded
from infra.kafka_admin import ensure_topics
from tests.helpers import pg_fetch, pg_scalar, wait_until, wait_until_async

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def svc_dir() -> Iterator[Path]:
    """A data dir the unprivileged PostgreSQL user can reach (pytest's tmp_path is mode 700)."""
    d = Path(tempfile.mkdtemp(prefix="arus-svc-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _gone(svc: embedded.EmbeddedService) -> None:
    """The service's whole process group is gone and its port closed."""
    wait_until(lambda: not embedded.group_members(svc.pid), 15, message=f"{svc.name} group still alive")
    assert not svc.alive()
    assert not embedded.port_is_listening("127.0.0.1", svc.port)


def _report(svc: embedded.EmbeddedService) -> None:
    print(f"{svc.name} started in {svc.started_s:.3f}s")


# --------------------------------------------------------------------------- Tansu


async def test_tansu_produce_and_consume(tmp_path: Path) -> None:
    svc = embedded.start_tansu(embedded.free_port(), tmp_path)
    _report(svc)
    try:
        topic = f"t{uuid.uuid4().hex[:8]}.probe"
        ensure_topics(svc.url, [topic], partitions=2)
        ensure_topics(svc.url, [topic], partitions=2)  # idempotent

        producer = AIOKafkaProducer(bootstrap_servers=svc.url, acks="all")
        await producer.start()
        try:
            meta = await producer.send_and_wait(topic, b"hello jember", key=b"k1", partition=1)
        finally:
            await producer.stop()
        assert meta.partition == 1 and meta.offset == 0

        # A consumer group, as Faust and the sink use: that is what Tansu must support.
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=svc.url, group_id=f"g{uuid.uuid4().hex[:6]}",
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        try:
            got: list[bytes] = []

            async def received() -> bool:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    got.extend(r.value for r in records)
                return bool(got)

            await wait_until_async(received, 30, message="message back from Tansu")
            assert got == [b"hello jember"]
            await consumer.commit()
            committed = await consumer.committed(TopicPartition(topic, 1))
            assert committed == 1
        finally:
            await consumer.stop()
    finally:
        svc.stop()
    _gone(svc)


def test_tansu_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    svc = embedded.start_tansu(embedded.free_port(), tmp_path / "a")
    try:
        with pytest.raises(embedded.EmbeddedServiceError, match="already in use"):
            embedded.start_tansu(svc.port, tmp_path / "b")
    finally:
        svc.stop()
    _gone(svc)


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_select_and_data_survive_a_restart(svc_dir: Path) -> None:
    tmp_path = svc_dir
    port = embedded.free_port()
    svc = embedded.start_postgres(port, tmp_path)
    _report(svc)
    assert svc.url == f"postgresql://arus@127.0.0.1:{port}/arus"
    try:
        assert pg_scalar(svc.url, "SELECT 1") == 1
        settings = dict(pg_fetch(svc.url, "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                                 (["fsync", "synchronous_commit", "max_connections", "wal_level"],)))
        assert settings == {"fsync": "on", "synchronous_commit": "on", "max_connections": "200",
                            "wal_level": "minimal"}
        pg_fetch(svc.url, "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('durable')")
    finally:
        svc.stop()
    _gone(svc)

    # `arus up` keeps its data across restarts: the same cluster comes back, even on another port.
    again = embedded.start_postgres(embedded.free_port(), tmp_path)
    _report(again)
    try:
        assert pg_scalar(again.url, "SELECT v FROM kept") == "durable"
    finally:
        again.stop()
    _gone(again)


def test_postgres_after_a_crash(svc_dir: Path) -> None:
    """SIGKILL of the whole cluster (power cut): it comes back with every committed row."""
    tmp_path = svc_dir
    svc = embedded.start_postgres(embedded.free_port(), tmp_path)
    pg_fetch(svc.url, "CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
    embedded.kill_group(svc.pid, signal.SIGKILL)
    svc.process.wait(timeout=10)
    _gone(svc)
    again = embedded.start_postgres(svc.port, tmp_path)
    try:
        assert pg_scalar(again.url, "SELECT count(*) FROM t") == 1000
    finally:
        again.stop()
    _gone(again)


def test_resolve_local_postgres_url_creates_its_user_and_database(svc_dir: Path) -> None:
    tmp_path = svc_dir
    port = embedded.free_port()
    url = f"postgresql://jember:ignored@127.0.0.1:{port}/satudata"
    resolved, svc = embedded.resolve_or_start(url, "postgres", tmp_path)
    assert resolved == url and svc is not None
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            assert conn.execute("SELECT current_user, current_database()").fetchone() == ("jember", "satudata")
        # Now something listens there: the same URL is used as is.
        assert embedded.resolve_or_start(url, "postgres", tmp_path) == (url, None)
    finally:
        svc.stop()
    _gone(svc)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_postgres_data_dir_unreachable_for_the_server_user(tmp_path: Path) -> None:
    """tmp_path is mode 700 under root: the cluster goes to /var/lib/arus, linked from data_dir/pg."""
    svc = embedded.start_postgres(embedded.free_port(), tmp_path)
    real = (tmp_path / "pg").resolve()
    try:
        assert (tmp_path / "pg").is_symlink() and str(real).startswith("/var/lib/arus/")
        assert pg_scalar(svc.url, "SELECT 1") == 1
    finally:
        svc.stop()
        shutil.rmtree(real, ignore_errors=True)
    _gone(svc)


# --------------------------------------------------------------------------- MQTT


def _mqtt_client(port: int, client_id: str, clean: bool = True) -> tuple[mqtt.Client, queue.Queue[bytes]]:
    received: queue.Queue[bytes] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
    c.on_message = lambda client, userdata, msg: received.put(bytes(msg.payload))
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    wait_until(c.is_connected, 10, message=f"{client_id} connected")
    return c, received


def _subscribe(c: mqtt.Client, topic: str) -> None:
    done: queue.Queue[bool] = queue.Queue()
    c.on_subscribe = lambda *a: done.put(True)
    c.subscribe(topic, qos=1)
    done.get(timeout=10)


def _close(c: mqtt.Client) -> None:
    c.disconnect()
    c.loop_stop()


@pytest.mark.parametrize("backend", ["mosquitto", "amqtt"])
def test_mqtt_publish_subscribe_qos1(tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "amqtt":
        monkeypatch.setattr(embedded, "_mosquitto_bin", lambda: None)  # as on a machine without it
    elif embedded.mqtt_backend() != "mosquitto":
        pytest.skip("mosquitto is not installed")
    svc = embedded.start_mqtt(embedded.free_port(), tmp_path)
    _report(svc)
    assert svc.name == backend == embedded.mqtt_backend()
    try:
        sub, received = _mqtt_client(svc.port, "sub-1")
        _subscribe(sub, "jember/v1/+/telemetry")
        pub, _ = _mqtt_client(svc.port, "pub-1")
        info = pub.publish("jember/v1/awlr-01/telemetry", b'{"values":{"waterLevel":1.2}}', qos=1)
        info.wait_for_publish(timeout=10)
        assert received.get(timeout=10) == b'{"values":{"waterLevel":1.2}}'
        _close(pub)
        _close(sub)
    finally:
        svc.stop()
    _gone(svc)


@pytest.mark.skipif(embedded.mqtt_backend() != "mosquitto", reason="amqtt keeps sessions in memory only")
def test_mqtt_persistent_session_survives_a_broker_restart(tmp_path: Path) -> None:
    """A QoS 1 message queued for an offline persistent session is delivered after a restart."""
    port = embedded.free_port()
    svc = embedded.start_mqtt(port, tmp_path)
    try:
        gw, _ = _mqtt_client(port, "gateway-persist", clean=False)
        _subscribe(gw, "jember/v1/+/telemetry")
        _close(gw)  # offline: the broker queues for it now
        pub, _ = _mqtt_client(port, "pub-2")
        pub.publish("jember/v1/awlr-02/telemetry", b"queued", qos=1).wait_for_publish(timeout=10)
        _close(pub)
    finally:
        svc.stop()  # SIGTERM: mosquitto writes its persistence file
    _gone(svc)
    again = embedded.start_mqtt(port, tmp_path)
    try:
        gw, received = _mqtt_client(port, "gateway-persist", clean=False)
        assert received.get(timeout=10) == b"queued"
        _close(gw)
    finally:
        again.stop()
    _gone(again)


# --------------------------------------------------------------------------- session fixtures


def test_session_fixtures(arus_env, kafka_bootstrap: str, mqtt_url: str, database_url: str,
                          fresh_database_url: str) -> None:
    env = arus_env()
    assert env["ARUS_KAFKA_BOOTSTRAP"] == kafka_bootstrap
    assert env["ARUS_MQTT_URL"] == mqtt_url
    assert env["ARUS_DATABASE_URL"] == database_url
    assert re.fullmatch(r"t[0-9a-f]{10}\.", env["ARUS_TOPIC_PREFIX"])
    assert arus_env(fresh_database_url)["ARUS_DATABASE_URL"] == fresh_database_url
    for url in (database_url, fresh_database_url):
        assert pg_scalar(url, "SELECT count(*) FROM schema_migrations") >= 1
        assert pg_scalar(url, "SELECT to_regclass('readings') IS NOT NULL") is True
    assert embedded.kafka_metadata_ok(*kafka_bootstrap.split(":"))  # type: ignore[arg-type]


def test_fresh_databases_are_separate(fresh_database_url: str, pg_server_url: str) -> None:
    pg_fetch(fresh_database_url, "CREATE TABLE only_here (i int)")
    name = fresh_database_url.rsplit("/", 1)[1]
    assert pg_scalar(pg_server_url, "SELECT count(*) FROM pg_database WHERE datname = %s", (name,)) == 1


# --------------------------------------------------------------------------- arus up


def _start_up(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARUS_")}
    ports = {k: embedded.free_port() for k in ("kafka", "mqtt", "http")}
    env.update({
        "ARUS_DATA_DIR": str(tmp_path / "data"),
        "ARUS_HTTP_PORT": str(ports["http"]),
        # A local URL where nothing listens: the embedded one must start there.
        "ARUS_KAFKA_BOOTSTRAP": f"127.0.0.1:{ports['kafka']}",
        "ARUS_MQTT_URL": f"mqtt://127.0.0.1:{ports['mqtt']}",
        "ARUS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        "PYTHONUNBUFFERED": "1",
    })
    out = tmp_path / "up.log"
    proc = embedded.popen_in_group([sys.executable, "-m", "arus.cli", "up"], out, env=env, cwd=ROOT,
                                   deathsig=signal.SIGKILL)
    wait_until(lambda: "Ctrl-C stops everything" in out.read_text() or proc.poll() is not None, 120,
               message="arus up printed its table")
    assert proc.poll() is None, out.read_text()
    return proc, out, env


def _descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _all_gone(procs: list[psutil.Process]) -> bool:
    return not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_arus_up_starts_everything_and_leaves_nothing(svc_dir: Path, how: str) -> None:
    tmp_path = svc_dir
    proc, out, env = _start_up(tmp_path)
    try:
        text = out.read_text()
        for what in ("PostgreSQL", "Kafka", "MQTT", "API", f"http://127.0.0.1:{env['ARUS_HTTP_PORT']}/"):
            assert what in text, text
        assert env["ARUS_KAFKA_BOOTSTRAP"] in text and env["ARUS_MQTT_URL"] in text
        assert embedded.kafka_metadata_ok(*env["ARUS_KAFKA_BOOTSTRAP"].split(":"))  # type: ignore[arg-type]
        kids = _descendants(proc.pid)
        names = " ".join(" ".join(p.cmdline()) for p in kids)
        for child in ("gateway", "worker", "sink", "api", "postgres", "mosquitto|amqtt", "tansu"):
            assert re.search(child, names), f"{child} not among {names}"
        if how == "sigterm":
            # One `arus up` per data directory: a second one says so and leaves the first alone.
            second = subprocess.run([sys.executable, "-m", "arus.cli", "up"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=60,
                                    env={**env, "ARUS_HTTP_PORT": str(embedded.free_port())})
            assert second.returncode == 1 and "another `arus up` is running" in second.stdout, second
            assert all(p.is_running() for p in kids)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, out.read_text()
            assert "arus stopped" in out.read_text()
        else:
            proc.kill()
            proc.wait(timeout=10)
        wait_until(lambda: _all_gone(kids), 30, message=f"processes left behind after {how}: "
                   f"{[p.pid for p in kids if p.is_running()]}")
        assert not embedded.port_is_listening("127.0.0.1", int(env["ARUS_HTTP_PORT"]))
    finally:
        embedded.stop_process(proc, timeout=20)
        if how == "sigkill":
            # The supervisor could not stop PostgreSQL itself: its parent-death signal did.
            log = (tmp_path / "data" / "logs" / "postgres.log").read_text()
            assert "received fast shutdown request" in log
