"""The broker's password file and ACL generated from the registry (infra/mqtt_auth.py): hash format
(checked against mosquitto_passwd when installed), file texts, the ACL semantics amqtt enforces,
atomic writes, and the registry -> files -> reload loop with a fake connection."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from infra import mqtt_auth
from infra.devices import add_device, hash_secret, verify_secret
from infra.mqtt_auth import (
    AuthSync,
    allowed,
    filter_matches,
    gateway_account,
    generate,
    parse_acl,
    parse_passwd,
    verify_broker_hash,
    with_credentials,
    write_atomic,
)
from schemas.errors import ConfigError

GW = gateway_account("arus-gateway", "gw-secret")


def test_hash_is_mosquittos_pbkdf2_sha512_format() -> None:
    stored = hash_secret("s3cret")
    prefix, iterations, salt, digest = stored.split("$")[1:]
    assert prefix == "7" and int(iterations) == mqtt_auth.ITERATIONS
    assert len(__import__("base64").b64decode(salt)) == 12 and len(__import__("base64").b64decode(digest)) == 64
    assert verify_secret("s3cret", stored) and not verify_secret("s3cret!", stored)
    assert hash_secret("s3cret") != stored  # salted


def test_legacy_sha256_hashes_still_verify() -> None:
    import hashlib

    salt = bytes(range(16))
    digest = hashlib.pbkdf2_hmac("sha256", b"old", salt, 1000)
    legacy = f"pbkdf2_sha256$1000${salt.hex()}${digest.hex()}"
    assert verify_secret("old", legacy) and not verify_secret("new", legacy)
    assert not mqtt_auth.is_broker_hash(legacy)
    for broken in (None, "", "x$y", "$7$abc$!!$??", "md5$1$2$3"):
        assert not verify_secret("old", broken)


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd not installed")
def test_mosquitto_passwd_hashes_verify_here(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(path), "dev-1", "s3cret"], check=True, timeout=10)
    user, stored = path.read_text().strip().split(":", 1)
    assert user == "dev-1" and stored.startswith("$7$")
    assert verify_broker_hash("s3cret", stored) and not verify_broker_hash("wrong", stored)


def test_generated_files_list_active_devices_and_the_gateway() -> None:
    legacy = "pbkdf2_sha256$1$00$00"
    devices = [("wl-2", hash_secret("b")), ("wl-1", hash_secret("a")), ("old-1", legacy), ("nohash", None),
               ("arus-gateway", hash_secret("impostor"))]
    files = generate(devices, [GW])
    users = parse_passwd(files.passwd)
    assert list(users) == ["arus-gateway", "wl-1", "wl-2"]
    assert verify_broker_hash("gw-secret", users["arus-gateway"])  # the impostor device lost
    assert verify_broker_hash("a", users["wl-1"])
    assert files.devices == 2 and set(files.skipped) == {"old-1", "nohash", "arus-gateway"}
    assert "pattern write jember/v1/%u/#" in files.acl and "pattern read jember/v1/%u/errors" in files.acl
    assert "user arus-gateway\ntopic read jember/v1/+/telemetry\ntopic read jember/v1/+/status\n" \
           "topic write jember/v1/+/errors" in files.acl
    assert generate([], []).passwd == ""


def test_usernames_that_break_the_files_are_refused() -> None:
    for bad in ("a:b", "a b", "a/b", "a+b", "#", ""):
        with pytest.raises(ConfigError):
            gateway_account(bad, "x")


@pytest.mark.parametrize(("pattern", "topic", "expected"), [
    ("jember/v1/dev/#", "jember/v1/dev/telemetry", True),
    ("jember/v1/dev/#", "jember/v1/dev", True),
    ("jember/v1/dev/#", "jember/v1/other/telemetry", False),
    ("jember/v1/+/telemetry", "jember/v1/x/telemetry", True),
    ("jember/v1/+/telemetry", "jember/v1/+/telemetry", True),  # a subscription filter
    ("jember/v1/+/telemetry", "jember/v1/#", False),
    ("jember/v1/+/telemetry", "jember/v1/x/status", False),
    ("jember/v1/+/telemetry", "jember/v1/x/telemetry/more", False),
    ("a/b", "a/b/c", False),
])
def test_filter_matching(pattern: str, topic: str, expected: bool) -> None:
    assert filter_matches(pattern, topic) is expected


def test_acl_semantics_devices_gateway_anonymous() -> None:
    acl = parse_acl(generate([("wl-1", hash_secret("a"))], [GW]).acl)
    assert allowed(acl, "wl-1", "jember/v1/wl-1/telemetry", "write")
    assert allowed(acl, "wl-1", "jember/v1/wl-1/status", "write")
    assert allowed(acl, "wl-1", "jember/v1/wl-1/errors", "read")
    assert not allowed(acl, "wl-1", "jember/v1/wl-2/telemetry", "write")  # another device's topic
    assert not allowed(acl, "wl-1", "jember/v1/wl-2/errors", "read")
    assert not allowed(acl, "wl-1", "jember/v1/+/telemetry", "read")
    assert not allowed(acl, "wl-1", "jember/v1/wl-1/telemetry", "read")
    assert allowed(acl, "arus-gateway", "jember/v1/+/telemetry", "read")
    assert allowed(acl, "arus-gateway", "jember/v1/wl-1/status", "read")
    assert allowed(acl, "arus-gateway", "jember/v1/wl-1/errors", "write")
    assert not allowed(acl, "arus-gateway", "jember/v1/#", "read")
    assert not allowed(acl, None, "jember/v1/wl-1/telemetry", "write")
    assert not allowed(acl, "wl-1", "$SYS/broker/uptime", "read")
    deny = parse_acl("user a\ntopic x/#\ntopic deny x/secret\npattern read p/%u\n")
    assert allowed(deny, "a", "x/y", "write") and not allowed(deny, "a", "x/secret", "read")
    assert allowed(deny, "b", "p/b", "read") and not allowed(deny, "b", "p/a", "read")


def test_write_atomic_only_rewrites_on_change(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "passwd"
    assert write_atomic(path, "a:1\n")
    assert path.read_text() == "a:1\n" and (path.stat().st_mode & 0o777) == 0o600
    inode = path.stat().st_ino
    assert not write_atomic(path, "a:1\n")
    assert path.stat().st_ino == inode
    assert write_atomic(path, "a:2\n", mode=0o640)
    assert path.stat().st_ino != inode and (path.stat().st_mode & 0o777) == 0o640  # renamed over
    assert [p.name for p in path.parent.iterdir()] == ["passwd"]  # no temp file left


class FakeConn:
    """Enough of a psycopg connection for AuthSync: the two queries it runs."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, Any]] = {}  # id -> (hash, revoked)
        self.queries = 0

    def execute(self, sql: str, params: Any = None) -> Any:
        self.queries += 1
        active = sorted((k, h) for k, (h, revoked) in self.rows.items() if not revoked)
        if "hashtext" in sql:
            return _Result([(len(self.rows), hash(tuple(sorted(self.rows.items()))))])
        return _Result(active)


class _Result:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def fetchone(self) -> Any:
        return self.rows[0]

    def fetchall(self) -> list[Any]:
        return self.rows


def test_auth_sync_regenerates_and_reloads_only_on_change(tmp_path: Path) -> None:
    reloads: list[int] = []
    conn = FakeConn()
    sync = AuthSync(tmp_path, [GW], reload=lambda: reloads.append(1))
    conn.rows["wl-1"] = (hash_secret("a"), False)
    assert sync.sync(conn) and reloads == [1]
    assert "wl-1" in parse_passwd((tmp_path / "passwd").read_text())
    assert not sync.sync(conn) and reloads == [1]  # unchanged registry: one cheap query, no reload
    assert not sync.sync(conn, force=True) and reloads == [1]  # regenerated, same content: no reload
    conn.rows["wl-1"] = (hash_secret("a"), True)  # revoked
    assert sync.sync(conn) and reloads == [1, 1]
    assert "wl-1" not in parse_passwd((tmp_path / "passwd").read_text())


def test_url_credentials_round_trip() -> None:
    url = with_credentials("mqtt://127.0.0.1:1883", "arus-gateway", "p@ss:/word")
    assert url.startswith("mqtt://arus-gateway:") and url.endswith("@127.0.0.1:1883")
    assert mqtt_auth.url_credentials(url) == ("arus-gateway", "p@ss:/word")
    assert mqtt_auth.url_credentials("mqtt://h:1") == (None, None)


def test_secret_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "gateway.secret"
    first = mqtt_auth.load_or_create_secret(path)
    assert len(first) >= 32 and (path.stat().st_mode & 0o777) == 0o600
    os.chmod(path, 0o644)
    assert mqtt_auth.load_or_create_secret(path) == first and (path.stat().st_mode & 0o777) == 0o600


def test_reload_targets_and_signal(tmp_path: Path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        pid_file = tmp_path / "pid"
        pid_file.write_text(f"{proc.pid}\n")
        assert mqtt_auth.reload_targets([], pid_file) == [proc.pid]
        assert proc.pid in mqtt_auth.pids_named("sleep")
        assert mqtt_auth.signal_broker([proc.pid], signal.SIGTERM) == [proc.pid]
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert mqtt_auth.signal_broker([proc.pid]) == []  # gone: nothing to signal
    finally:
        proc.kill()
        proc.wait()


def test_reserved_device_ids_are_refused() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        add_device(None, "arus-gateway", "water_level", "35.09.19.1001")  # type: ignore[arg-type]


def test_embedded_broker_configs_enforce_the_files(tmp_path: Path) -> None:
    from infra import embedded

    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    conf = embedded._amqtt_conf(1883, passwd, acl)
    plugins = conf["plugins"]
    assert isinstance(plugins, dict)
    assert set(plugins) == {"infra.amqtt_auth.RegistryAuthPlugin", "infra.amqtt_auth.RegistryTopicPlugin"}
    assert plugins["infra.amqtt_auth.RegistryAuthPlugin"] == {"password_file": str(passwd), "acl_file": str(acl)}
    open_conf = embedded._amqtt_conf(1883, None)["plugins"]
    assert isinstance(open_conf, dict) and "amqtt.plugins.authentication.AnonymousAuthPlugin" in open_conf
    mosq = embedded._mosquitto_conf(1883, tmp_path, passwd, acl).splitlines()
    assert "allow_anonymous false" in mosq and f"password_file {passwd}" in mosq and f"acl_file {acl}" in mosq
    assert "allow_anonymous true" in embedded._mosquitto_conf(1883, tmp_path, None, None).splitlines()
    assert embedded.starts_embedded(None, "mqtt")
    assert embedded.starts_embedded(f"mqtt://u:p@127.0.0.1:{embedded.free_port()}", "mqtt")
    assert not embedded.starts_embedded("mqtt://u:p@mosquitto:1883", "mqtt")
