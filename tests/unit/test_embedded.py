"""infra.embedded without starting any server: ports, the product rule, URL parsing, log tails."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra import embedded
from infra.embedded import parse_endpoint, resolve_or_start


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


@pytest.fixture
def starts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Record what resolve_or_start would start, instead of starting it (unit tests start nothing)."""
    calls: list[tuple[str, int]] = []

    class FakeService:
        def __init__(self, kind: str, port: int) -> None:
            self.url = f"{kind}-embedded:{port}"

    def fake_start(kind: str, port: int, data_dir: Path, url: str | None,
                   mqtt_auth: tuple[Path, Path] | None = None) -> FakeService:
        calls.append((kind, port))
        return FakeService(kind, port)

    monkeypatch.setattr(embedded, "_start", fake_start)
    return calls


def test_free_port_is_bindable() -> None:
    port = embedded.free_port()
    assert 1024 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_port_is_listening(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert embedded.port_is_listening("127.0.0.1", port)
    listener.close()
    assert not embedded.port_is_listening("127.0.0.1", port)


def test_wait_port_times_out_with_embedded_service_error() -> None:
    with pytest.raises(embedded.EmbeddedServiceError):
        embedded.wait_port("127.0.0.1", embedded.free_port(), timeout=0.2)


def test_wait_port_returns_when_listening(listener: socket.socket) -> None:
    embedded.wait_port("127.0.0.1", listener.getsockname()[1], timeout=2)


@pytest.mark.parametrize("kind", ["kafka", "postgres", "mqtt"])
def test_unset_url_starts_embedded(kind: str, starts: list[tuple[str, int]], tmp_path: Path) -> None:
    url, svc = resolve_or_start(None, kind, tmp_path)
    assert svc is not None and len(starts) == 1 and starts[0][0] == kind
    assert url == svc.url


def test_unset_url_prefers_the_standard_port_when_free(
    starts: list[tuple[str, int]], tmp_path: Path, listener: socket.socket
) -> None:
    free = embedded.free_port()
    resolve_or_start(None, "mqtt", tmp_path, preferred_port=free)
    busy = listener.getsockname()[1]
    resolve_or_start(None, "mqtt", tmp_path, preferred_port=busy)
    assert starts[0] == ("mqtt", free)
    assert starts[1][1] != busy


@pytest.mark.parametrize(
    ("kind", "template"),
    [
        ("kafka", "127.0.0.1:{port}"),
        ("kafka", "localhost:{port},127.0.0.1:1"),
        ("postgres", "postgresql://arus@127.0.0.1:{port}/arus"),
        ("postgres", "postgresql://me:secret@localhost:{port}/mydb"),
        ("mqtt", "mqtt://127.0.0.1:{port}"),
        ("mqtt", "mqtt://gw:pw@localhost:{port}"),
    ],
)
def test_local_url_not_listening_starts_embedded_there(
    kind: str, template: str, starts: list[tuple[str, int]], tmp_path: Path
) -> None:
    port = embedded.free_port()
    url = template.format(port=port)
    resolved, svc = resolve_or_start(url, kind, tmp_path)
    assert starts == [(kind, port)]
    assert svc is not None
    assert resolved == url  # the given URL stays the one to use


@pytest.mark.parametrize("kind", ["kafka", "postgres", "mqtt"])
def test_local_url_listening_is_used_as_is(
    kind: str, starts: list[tuple[str, int]], tmp_path: Path, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    url = {"kafka": f"127.0.0.1:{port}", "postgres": f"postgresql://u@localhost:{port}/d",
           "mqtt": f"mqtt://127.0.0.1:{port}"}[kind]
    assert resolve_or_start(url, kind, tmp_path) == (url, None)
    assert starts == []


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("kafka", "kafka-1.jember.go.id:9092,kafka-2.jember.go.id:9092"),
        ("postgres", "postgresql://arus:x@timescale.jember.go.id:5432/arus"),
        ("mqtt", "mqtt://gateway:pw@mqtt.jember.go.id:1883"),
    ],
)
def test_remote_url_is_used_as_is_without_connecting(
    kind: str, url: str, starts: list[tuple[str, int]], tmp_path: Path
) -> None:
    assert resolve_or_start(url, kind, tmp_path) == (url, None)
    assert starts == []


def test_unknown_kind_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        resolve_or_start(None, "redis", tmp_path)


@pytest.mark.parametrize(
    ("url", "kind", "host", "port"),
    [
        ("127.0.0.1:19092", "kafka", "127.0.0.1", 19092),
        ("broker:9093, other:9094", "kafka", "broker", 9093),
        ("localhost", "kafka", "localhost", 9092),
        ("postgresql://arus@127.0.0.1/arus", "postgres", "127.0.0.1", 5432),
        ("postgresql://a:b@db.example:6543/x?sslmode=require", "postgres", "db.example", 6543),
        ("mqtt://u:p@127.0.0.1:18830", "mqtt", "127.0.0.1", 18830),
        ("mqtt://localhost", "mqtt", "localhost", 1883),
    ],
)
def test_parse_endpoint(url: str, kind: str, host: str, port: int) -> None:
    assert parse_endpoint(url, kind) == embedded.Endpoint(host, port)


def test_mqtt_backend_is_known() -> None:
    assert embedded.mqtt_backend() in {"mosquitto", "amqtt"}


def test_tail_reads_from_the_last_start_mark(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text(f"{embedded.START_MARK}1: a\nold 1\nold 2\n{embedded.START_MARK}2: b\nnew 1\nnew 2\n")
    assert embedded.tail(log, 10) == "new 1\nnew 2"
    assert embedded.tail(log, 1) == "new 2"
    assert embedded.tail(tmp_path / "missing.log") == ""


def test_kafka_probe_is_false_for_a_non_kafka_listener(listener: socket.socket) -> None:
    # The listener accepts and never answers; the probe must give up, not hang.
    assert not embedded.kafka_metadata_ok("127.0.0.1", listener.getsockname()[1], timeout=0.3)
    assert not embedded.kafka_metadata_ok("127.0.0.1", embedded.free_port(), timeout=0.3)


def test_mqtt_probe_is_none_without_a_broker(listener: socket.socket) -> None:
    assert embedded.mqtt_connack("127.0.0.1", listener.getsockname()[1], timeout=0.3) is None
    assert embedded.mqtt_connack("127.0.0.1", embedded.free_port(), timeout=0.3) is None


def test_mosquitto_conf_keeps_sessions_and_queues(tmp_path: Path) -> None:
    conf = embedded._mosquitto_conf(18831, tmp_path, None, None)
    for line in ("listener 18831 127.0.0.1", "allow_anonymous true", "persistence true",
                 f"persistence_location {tmp_path}/", "max_queued_messages 1000000",
                 "max_inflight_messages 1000", "persistent_client_expiration 1d"):
        assert line in conf.splitlines()
    secured = embedded._mosquitto_conf(18831, tmp_path, tmp_path / "pw", tmp_path / "acl")
    assert "allow_anonymous false" in secured
    assert f"password_file {tmp_path / 'pw'}" in secured
    assert f"acl_file {tmp_path / 'acl'}" in secured
