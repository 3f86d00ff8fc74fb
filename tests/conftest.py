"""Shared fixtures: real Tansu, PostgreSQL and MQTT on random ports, started once per session.

Services start lazily (only for tests that ask for them) with infra.embedded, under one temporary
directory, and are stopped at the end of the session. Each test gets its own topic prefix, so tests
never share topics; `fresh_database_url` gives a test its own migrated database.

Unit tests (tests/unit) may not use any service fixture: asking for one is an error.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
# `from tests.helpers import ...` works however pytest was started.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra import embedded  # noqa: E402

SERVICE_FIXTURES = frozenset({
    "embedded_stack", "kafka_bootstrap", "pg_server_url", "database_url", "fresh_database_url",
    "mqtt_url", "arus_env", "spawn_arus",
})
SERVICE_KINDS = ("kafka", "postgres", "mqtt")
START_ATTEMPTS = 3


# --------------------------------------------------------------------------- collection and reports


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            top = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
        except (ValueError, IndexError):
            continue
        if top == "integration":
            item.add_marker(pytest.mark.integration)
        elif top == "chaos":
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.chaos)
        elif top == "security":
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.security)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    try:
        top = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return
    used = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if top == "unit" and used:
        pytest.fail(f"unit tests must not start services; move this test to tests/integration "
                    f"(it uses {', '.join(sorted(used))})", pytrace=False)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Keep each phase's report on the item, so fixtures can tell at teardown whether the test failed.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def _test_failed(node: Any) -> bool:
    return any(getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call"))


# --------------------------------------------------------------------------- the embedded stack


@dataclass
class EmbeddedStack:
    """The session's services, started on first use and restarted (same port) if one died."""

    base: Path
    services: dict[str, embedded.EmbeddedService] = field(default_factory=dict)
    start_times: dict[str, float] = field(default_factory=dict)

    def _start(self, kind: str) -> embedded.EmbeddedService:
        starters = {"kafka": embedded.start_tansu, "postgres": embedded.start_postgres,
                    "mqtt": embedded.start_mqtt}
        last: Exception | None = None
        for _ in range(START_ATTEMPTS):  # a random port can be taken between the pick and the bind
            try:
                svc = starters[kind](embedded.free_port(), self.base / kind)
                self.start_times[kind] = svc.started_s
                return svc
            except embedded.EmbeddedServiceError as e:
                last = e
        raise embedded.EmbeddedServiceError(f"could not start {kind} in {START_ATTEMPTS} attempts: {last}")

    def get(self, kind: str) -> embedded.EmbeddedService:
        svc = self.services.get(kind)
        if svc is None:
            svc = self.services[kind] = self._start(kind)
        elif not svc.alive():
            # A test killed it (or it crashed): bring it back where the URLs already point.
            print(f"[arus tests] {svc.name} had died (exit {svc.process.returncode}); restarting\n"
                  f"{svc.log_tail(20)}", file=sys.stderr)
            svc.stop(timeout=1)
            assert svc.restart is not None
            svc = self.services[kind] = svc.restart()
        return svc

    def ensure_alive(self) -> None:
        for kind in list(self.services):
            self.get(kind)

    def stop_all(self) -> None:
        for kind in ("mqtt", "kafka", "postgres"):
            svc = self.services.pop(kind, None)
            if svc is not None:
                svc.stop(timeout=20)


@pytest.fixture(scope="session")
def embedded_stack(request: pytest.FixtureRequest) -> Iterator[EmbeddedStack]:
    # Not pytest's tmp dir: that one is mode 700 under /tmp/pytest-of-root, which the unprivileged
    # PostgreSQL user cannot traverse.
    base = Path(tempfile.mkdtemp(prefix="arus-test-"))
    os.chmod(base, 0o755)
    stack = EmbeddedStack(base)
    try:
        yield stack
    finally:
        stack.stop_all()
        if stack.start_times:
            times = ", ".join(f"{k} {v:.2f}s" for k, v in stack.start_times.items())
            _SUMMARY.append(f"embedded services started in: {times}")
        if request.session.testsfailed:
            _SUMMARY.append(f"service logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


_SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _SUMMARY:
        terminalreporter.write_line(f"[arus tests] {line}")


@pytest.fixture(scope="session")
def kafka_bootstrap(embedded_stack: EmbeddedStack) -> str:
    """host:port of a Tansu broker (memory-only; topics vanish if it restarts)."""
    return embedded_stack.get("kafka").url


@pytest.fixture(scope="session")
def mqtt_url(embedded_stack: EmbeddedStack) -> str:
    """mqtt://127.0.0.1:PORT of mosquitto (or amqtt when mosquitto is not installed); anonymous."""
    return embedded_stack.get("mqtt").url


@pytest.fixture(scope="session")
def pg_server_url(embedded_stack: EmbeddedStack) -> str:
    """The PostgreSQL server's maintenance database (`postgres`), for CREATE/DROP DATABASE."""
    svc = embedded_stack.get("postgres")
    return f"postgresql://{embedded.PG_USER}@127.0.0.1:{svc.port}/postgres"


def _db_url(pg_server_url: str, name: str) -> str:
    return pg_server_url.rsplit("/", 1)[0] + "/" + name


def _create_database(pg_server_url: str, name: str, template: str | None = None) -> None:
    import psycopg
    from psycopg import sql

    stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        stmt = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template))
    deadline = time.monotonic() + 30
    with psycopg.connect(pg_server_url, autocommit=True, connect_timeout=10) as conn:
        while True:
            try:
                conn.execute(stmt)
                return
            except psycopg.errors.ObjectInUse:
                # The template's last session (the migration) may still be closing on the server.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _drop_database(pg_server_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(pg_server_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> str:
    """A database migrated once for the whole session (shared: use unique ids in your test)."""
    from infra.db import migrate

    url = _db_url(pg_server_url, embedded.PG_DATABASE)
    migrate(url)
    return url


@pytest.fixture(scope="session")
def _template_database(pg_server_url: str) -> str:
    """A migrated database that nobody connects to, copied by `fresh_database_url`."""
    from infra.db import migrate

    name = "arus_template"
    _drop_database(pg_server_url, name)
    _create_database(pg_server_url, name)
    migrate(_db_url(pg_server_url, name))
    return name


@pytest.fixture
def fresh_database_url(pg_server_url: str, _template_database: str) -> Iterator[str]:
    """A database of this test alone, migrated (a copy of a migrated template, then `migrate` again)."""
    from infra.db import migrate

    name = f"t_{uuid.uuid4().hex[:12]}"
    _create_database(pg_server_url, name, template=_template_database)
    url = _db_url(pg_server_url, name)
    migrate(url)
    yield url
    _drop_database(pg_server_url, name)


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix of this test alone, e.g. `t1a2b3c4d5e.`."""
    return f"t{uuid.uuid4().hex[:10]}."


ArusEnv = Callable[..., dict[str, str]]


@pytest.fixture
def arus_env(
    embedded_stack: EmbeddedStack,
    kafka_bootstrap: str,
    mqtt_url: str,
    database_url: str,
    topic_prefix: str,
    tmp_path: Path,
) -> ArusEnv:
    """Factory of environments for `arus` processes of this test.

    `arus_env(database_url=None, partitions=4, create_topics=True, **extra)` returns os.environ
    without any inherited ARUS_* variable, plus ARUS_KAFKA_BOOTSTRAP, ARUS_DATABASE_URL (the
    session database unless given), ARUS_MQTT_URL, ARUS_TOPIC_PREFIX (this test's), ARUS_DATA_DIR,
    ARUS_HTTP_PORT (a free port) and ARUS_PARTITIONS; `extra` adds or overrides variables
    (`ARUS_BATCH_MAX="100"`). The topics of the prefix are created first unless create_topics=False.
    """
    embedded_stack.ensure_alive()
    session_database_url = database_url

    def make(
        database_url: str | None = None,
        *,
        partitions: int = 4,
        create_topics: bool = True,
        **extra: str,
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ARUS_")}
        env.update({
            "ARUS_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "ARUS_DATABASE_URL": database_url or session_database_url,
            "ARUS_MQTT_URL": mqtt_url,
            "ARUS_TOPIC_PREFIX": topic_prefix,
            "ARUS_DATA_DIR": str(tmp_path / "arus-data"),
            "ARUS_HTTP_PORT": str(embedded.free_port()),
            "ARUS_PARTITIONS": str(partitions),
            # persistent MQTT sessions are per client id: one per test, never shared across tests
            "ARUS_GATEWAY_CLIENT_ID": f"gw-{topic_prefix.rstrip('.')}",
            "PYTHONUNBUFFERED": "1",
        })
        env.update({k: str(v) for k, v in extra.items()})
        if create_topics:
            from infra.kafka_admin import ensure_topics
            from infra.settings import Settings
            from infra.topics import all_topics

            settings = Settings(topic_prefix=env["ARUS_TOPIC_PREFIX"], partitions=partitions)
            ensure_topics(env["ARUS_KAFKA_BOOTSTRAP"], list(all_topics(settings).values()), partitions)
        return env

    return make


@dataclass
class ArusProcess:
    """An `arus` process started by `spawn_arus`, in its own process group."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return embedded.tail(self.log_path, lines)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM to the group, SIGKILL after `timeout`; the exit code."""
        return embedded.stop_process(self.proc, timeout=timeout)

    def kill(self) -> int | None:
        """SIGKILL to the whole group at once (a crash)."""
        embedded.kill_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        return self.proc.poll()


SpawnArus = Callable[..., ArusProcess]


@pytest.fixture
def spawn_arus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SpawnArus]:
    """Factory: `spawn_arus("worker", env=env, name=None)` starts `python -m arus.cli worker`.

    Output goes to tmp_path/logs/NAME.log; everything spawned is stopped at teardown, and when the
    test failed the tail of each log is printed.
    """
    spawned: list[ArusProcess] = []

    def spawn(*args: str, env: dict[str, str], name: str | None = None) -> ArusProcess:
        label = name or re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(args[:2]) or "arus")
        log_path = tmp_path / "logs" / f"{label}-{len(spawned)}.log"
        argv = [sys.executable, "-m", "arus.cli", *args]
        proc = embedded.popen_in_group(argv, log_path, env=env, cwd=ROOT, deathsig=signal.SIGKILL)
        p = ArusProcess(label, argv, proc, log_path)
        spawned.append(p)
        return p

    yield spawn

    # SIGTERM to all at once, then wait: shutdowns overlap instead of adding up.
    for p in spawned:
        if p.alive():
            embedded.kill_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in spawned:
        embedded.stop_process(p.proc, timeout=max(0.5, deadline - time.monotonic()))
    if _test_failed(request.node):
        for p in spawned:
            print(f"\n----- {p.name} (pid {p.pid}, exit {p.proc.returncode}) {p.log_path} -----\n"
                  f"{p.log_tail(60)}")
