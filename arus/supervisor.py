"""`arus up`: start what is missing (Kafka, PostgreSQL, MQTT), then run and watch every service.

Rule of the public contract: an embedded component is started where its URL is unset, or where it
names a local address on which nothing listens yet; otherwise the given URL is used as is.
The supervisor restarts a child or an embedded service that dies (with backoff), and on Ctrl-C /
SIGTERM stops the children, then the embedded services, leaving no process behind: every process it
starts has its own process group and a parent-death signal, so even a SIGKILLed supervisor takes
them down with it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from infra import embedded, mqtt_auth
from infra.kafka_admin import ensure_topics
from infra.settings import Settings
from infra.topics import all_topics
from schemas.errors import ArusError, EmbeddedServiceError

log = logging.getLogger("arus.up")

SERVICES = ["gateway", "worker", "sink", "api"]
CHILD_STOP_TIMEOUT = 15.0
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
STABLE_AFTER = 30.0  # a child that ran this long gets its backoff reset
HEALTH_TIMEOUT = 90.0
AUTH_SYNC_INTERVAL = 1.0  # how often the registry is checked for device changes (add/revoke/rotate)
AUTH_FULL_SYNC_INTERVAL = 60.0


class _Stop(Exception):
    """Raised by the signal handler while starting up, to abort the start cleanly."""


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_MIN
    next_start: float = 0.0


@dataclass
class Component:
    """A resolved dependency: where it is, and the embedded service when arus started it."""

    kind: str
    label: str
    url: str
    service: embedded.EmbeddedService | None = None
    backoff: float = BACKOFF_MIN
    next_start: float = 0.0
    restarts: int = 0
    child_url: str | None = None  # what the children get (the MQTT URL with the gateway's login)


@dataclass
class Supervisor:
    settings: Settings
    simulate: bool = False
    simulate_rate: int = 200
    agency_rate: float = 30.0  # simulated agency service events per minute
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    components: dict[str, Component] = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)
    stopping: bool = False
    _starting: bool = True
    _signals: int = 0
    _lock: IO[bytes] | None = None
    _auth: mqtt_auth.AuthSync | None = None
    _auth_conn: Any = None
    _gateway_login: tuple[str, str] = ("", "")
    _next_auth_sync: float = 0.0
    _next_full_auth_sync: float = 0.0

    # ----------------------------------------------------------------- helpers

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir).absolute()

    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self.stopping = True
        if self._signals > 1:
            self._hurry(signum, frame)  # second Ctrl-C: no more patience for graceful shutdowns
        if self._starting:
            raise _Stop()

    def _hurry(self, signum: int, frame: FrameType | None) -> None:
        for c in self.children.values():
            if c.proc is not None:
                embedded.kill_group(c.proc.pid, signal.SIGKILL)

    # ----------------------------------------------------------------- start

    def resolve(self) -> None:
        s = self.settings
        db_url = s.database_url.get_secret_value() if s.database_url else None
        plan: list[tuple[str, str, str | None, int]] = [
            ("postgres", "PostgreSQL", db_url, 5432),
            ("kafka", "Kafka", s.kafka_bootstrap, 9092),
            ("mqtt", "MQTT", s.mqtt_url, 1883),
        ]
        for kind, label, url, port in plan:
            auth = None
            if kind == "mqtt":
                # The device registry is needed first: an embedded broker starts with its auth files.
                self.migrate()
                if embedded.starts_embedded(url, kind):
                    auth = self.prepare_mqtt_auth(url)
            t0 = time.monotonic()
            resolved, svc = embedded.resolve_or_start(url, kind, self.data_dir, preferred_port=port,
                                                      mqtt_auth=auth)
            self.components[kind] = Component(kind, label, resolved, svc)
            if svc is not None:
                self.say(f"  started {svc.name:<10} {_mask(resolved):<45} in {time.monotonic() - t0:.2f}s")
            else:
                self.say(f"  using   {label:<10} {_mask(resolved)}")
        self.finish_mqtt_auth()

    def migrate(self) -> None:
        from infra.db import migrate  # the migration runner (infra/db.py)

        applied = migrate(self.components["postgres"].url)
        self.say(f"  migrations: {', '.join(applied) if applied else 'up to date'}")

    def prepare_mqtt_auth(self, url: str | None) -> tuple[Path, Path]:
        """The password file and ACL an embedded broker starts with: every active device of the
        registry, plus the gateway's account (the credentials in ARUS_MQTT_URL when it has some,
        else `arus-gateway` with a random secret kept in DATA_DIR/mqtt/gateway.secret, mode 0600)."""
        user, password = mqtt_auth.url_credentials(url)
        if user is None or password is None:
            user = mqtt_auth.GATEWAY_USER
            password = mqtt_auth.load_or_create_secret(self.data_dir / "mqtt" / "gateway.secret")
        self._gateway_login = (user, password)
        auth_dir = self.data_dir / "mqtt" / "auth"
        self._auth = mqtt_auth.AuthSync(auth_dir, [mqtt_auth.gateway_account(user, password)],
                                        reload=self._reload_mqtt)
        self._auth_conn = None
        self.sync_mqtt_auth(force=True)
        return auth_dir / mqtt_auth.PASSWD_NAME, auth_dir / mqtt_auth.ACL_NAME

    def finish_mqtt_auth(self) -> None:
        comp = self.components["mqtt"]
        if comp.service is not None and self._auth is None:  # its port was freed meanwhile: never run open
            raise EmbeddedServiceError(f"MQTT port of {comp.url} changed hands during the start; try again")
        if comp.service is None or self._auth is None:
            self._auth = None  # an external broker: its own administration (e.g. `arus mqtt-auth`)
            comp.child_url = comp.url
            return
        user, password = self._gateway_login
        comp.child_url = mqtt_auth.with_credentials(comp.url, user, password)
        files = self._auth.last if self._auth else None
        if files is not None:
            self.say(f"  mqtt auth: {files.devices} device(s) + gateway user {user!r}; anonymous refused "
                     f"({self._auth.out_dir if self._auth else ''}, reloaded when the registry changes)")

    def _reload_mqtt(self) -> None:
        comp = self.components.get("mqtt")
        if comp is not None and comp.service is not None:
            embedded.reload_mqtt(comp.service)

    def sync_mqtt_auth(self, force: bool = False, regenerate: bool = False) -> None:
        """Regenerate the broker's files when the registry changed (cheap otherwise). `force`: at
        start, where a failure is fatal; later failures are logged and retried."""
        if self._auth is None:
            return
        import psycopg

        try:
            if self._auth_conn is None:
                self._auth_conn = psycopg.connect(self.components["postgres"].url, autocommit=True,
                                                  connect_timeout=5)
            self._auth.sync(self._auth_conn, force=force or regenerate)
        except (psycopg.Error, OSError) as e:
            if force:
                raise EmbeddedServiceError(f"cannot generate the MQTT password file: {e}") from e
            log.warning("mqtt auth sync failed (%s); retrying", e)
            if self._auth_conn is not None:
                with contextlib.suppress(Exception):
                    self._auth_conn.close()
            self._auth_conn = None

    def prepare(self) -> None:
        self.ensure_topics()

    def ensure_topics(self) -> None:
        topics = list(all_topics(self.settings).values())
        ensure_topics(self.components["kafka"].url, topics, self.settings.partitions)
        self.say(f"  topics: {len(topics)} with {self.settings.partitions} partitions "
                 f"({self.settings.topic_prefix}*)")

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "ARUS_KAFKA_BOOTSTRAP": self.components["kafka"].url,
            "ARUS_DATABASE_URL": self.components["postgres"].url,
            "ARUS_MQTT_URL": self.components["mqtt"].child_url or self.components["mqtt"].url,
            "ARUS_DATA_DIR": str(self.data_dir),
            "ARUS_HTTP_PORT": str(self.settings.http_port),
            "ARUS_TOPIC_PREFIX": self.settings.topic_prefix,
            "ARUS_PARTITIONS": str(self.settings.partitions),
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def plan_children(self) -> None:
        logs = self.data_dir / "logs"
        for name in SERVICES:
            self.children[name] = Child(name, [sys.executable, "-m", "arus.cli", name], logs / f"{name}.log")
        if self.simulate:
            self.children["simulate"] = Child(
                "simulate",
                [sys.executable, "-m", "arus.cli", "simulate", "--rate", str(self.simulate_rate),
                 "--agency-rate", str(self.agency_rate),
                 "--duration", "0"],
                logs / "simulate.log",
            )

    def spawn(self, child: Child) -> None:
        # SIGKILL when the supervisor itself is killed: nobody would be left to escalate a SIGTERM
        # that a child ignores, and every component is crash-safe by design.
        child.proc = embedded.popen_in_group(child.argv, child.log_path, env=self.child_env(), cwd=Path.cwd(),
                                             deathsig=signal.SIGKILL)
        child.started_at = time.monotonic()

    # ----------------------------------------------------------------- watch

    def check_components(self, now: float) -> None:
        for comp in self.components.values():
            svc = comp.service
            if svc is None or svc.alive() or svc.restart is None or now < comp.next_start:
                continue
            code = svc.process.returncode
            self.say(f"!! {svc.name} died (exit {code}); restarting it. Last log lines:\n"
                     f"{_indent(svc.log_tail(10))}")
            try:
                svc.stop(timeout=1)  # reap stragglers of its group
                comp.service = svc.restart()
                comp.restarts += 1
                comp.backoff = BACKOFF_MIN
                self.say(f".. {svc.name} restarted on {_mask(comp.url)} (pid {comp.service.pid}, "
                         f"restart #{comp.restarts})")
                if comp.kind == "kafka":
                    self.ensure_topics()  # the embedded broker is memory-only
            except (ArusError, OSError) as e:
                comp.next_start = now + comp.backoff
                self.say(f"!! restarting {svc.name} failed ({e}); next try in {comp.backoff:.0f}s")
                comp.backoff = min(BACKOFF_MAX, comp.backoff * 2)

    def check_children(self, now: float) -> None:
        for child in self.children.values():
            proc = child.proc
            if proc is None:
                if now >= child.next_start:
                    self.spawn(child)
                    child.restarts += 1
                    self.say(f".. {child.name} restarted (restart #{child.restarts})")
                continue
            code = proc.poll()
            if code is None:
                continue
            ran = now - child.started_at
            embedded.kill_group(proc.pid, signal.SIGKILL)
            if ran >= STABLE_AFTER:
                child.backoff = BACKOFF_MIN
            # The whole story the first time; a reminder when it keeps failing.
            lines = 15 if child.backoff == BACKOFF_MIN else 2
            self.say(f"!! {child.name} exited with {code} after {ran:.1f}s; restarting in "
                     f"{child.backoff:.0f}s. Last lines of {child.log_path}:\n"
                     f"{_indent(embedded.tail(child.log_path, lines))}")
            child.proc = None
            child.next_start = now + child.backoff
            child.backoff = min(BACKOFF_MAX, child.backoff * 2)

    def api_healthy(self) -> bool:
        url = f"http://127.0.0.1:{self.settings.http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - fixed local http URL
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def print_table(self) -> None:
        rows = []
        for comp in self.components.values():
            svc = comp.service
            how = f"embedded {svc.name}, pid {svc.pid}" if svc else "external"
            if svc and comp.kind == "kafka":
                how += " (memory-only)"
            rows.append((comp.label, _mask(comp.url), how))
        port = self.settings.http_port
        rows.append(("API", f"http://127.0.0.1:{port}/", f"OpenAPI at http://127.0.0.1:{port}/openapi.json"))
        rows.append(("Console", f"http://127.0.0.1:{port}/", "operator console: live alerts, status per kecamatan"
                                                               " (token: arus operators add NAME)"))
        rows.append(("Public", f"http://127.0.0.1:{port}/public", "program indicators per kecamatan, open data"))
        procs = ", ".join(f"{c.name} {c.proc.pid}" for c in self.children.values() if c.proc is not None)
        rows.append(("Processes", procs, f"simulator at {self.simulate_rate} msg/s" if self.simulate else ""))
        rows.append(("Data", str(self.data_dir), f"logs in {self.data_dir / 'logs'}"))
        w1 = max(len(r[0]) for r in rows)
        w2 = max(len(r[1]) for r in rows)
        line = "-" * (w1 + w2 + 30)
        self.say(line)
        for a, b, c in rows:
            self.say(f"  {a:<{w1}}  {b:<{w2}}  {c}")
        self.say(line)

    # ----------------------------------------------------------------- stop

    def shutdown(self) -> None:
        # The stop itself is not interrupted; another Ctrl-C only hurries the children (SIGKILL).
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._hurry)
        running = [c for c in self.children.values() if c.proc is not None]
        if running:
            self.say(f"stopping {', '.join(c.name for c in running)} ...")
        procs = [c.proc for c in running if c.proc is not None]
        for proc in procs:
            embedded.kill_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT
        for proc in procs:
            embedded.stop_process(proc, timeout=max(0.1, deadline - time.monotonic()))
        # Producers of load first, the database last: nothing writes to a stopped store.
        if self._auth_conn is not None:
            with contextlib.suppress(Exception):
                self._auth_conn.close()
        for kind in ("mqtt", "kafka", "postgres"):
            comp = self.components.get(kind)
            if comp is not None and comp.service is not None:
                self.say(f"stopping {comp.service.name} ...")
                comp.service.stop(timeout=30)
        self.say("arus stopped")

    # ----------------------------------------------------------------- main

    def run(self) -> int:
        previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, self._on_signal)
        code = 0
        try:
            try:
                if embedded.port_is_listening("127.0.0.1", self.settings.http_port):
                    self.say(f"error: port {self.settings.http_port} is already in use; set ARUS_HTTP_PORT "
                             "to a free port")
                    return 2
                self.say(f"arus up: data in {self.data_dir}")
                self._lock = _lock_data_dir(self.data_dir)
                self.resolve()
                self.prepare()
                self.plan_children()
                for child in self.children.values():
                    self.spawn(child)
                self._starting = False
            except _Stop:
                self.say("interrupted while starting")
                return 130
            except (ArusError, OSError) as e:
                self.say(f"error: arus up could not start: {e}")
                return 1
            self.print_table()
            self.say("Ctrl-C stops everything.")
            healthy_reported = False
            health_deadline = time.monotonic() + HEALTH_TIMEOUT
            while not self.stopping:
                now = time.monotonic()
                self.check_components(now)
                self.check_children(now)
                if now >= self._next_auth_sync:
                    self._next_auth_sync = now + AUTH_SYNC_INTERVAL
                    full = now >= self._next_full_auth_sync  # a safety net under the fingerprint
                    if full:
                        self._next_full_auth_sync = now + AUTH_FULL_SYNC_INTERVAL
                    self.sync_mqtt_auth(regenerate=full)
                if not healthy_reported and self.api_healthy():
                    healthy_reported = True
                    self.say(f"ready: open http://127.0.0.1:{self.settings.http_port}/")
                elif not healthy_reported and now > health_deadline:
                    healthy_reported = True
                    self.say(f"!! the API does not answer /healthz after {HEALTH_TIMEOUT:.0f}s; "
                             f"see {self.data_dir / 'logs' / 'api.log'}")
                time.sleep(0.2)
        finally:
            self._starting = False
            self.shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return code


def run_up(settings: Settings, simulate: bool, simulate_rate: int = 200, agency_rate: float = 30.0) -> int:
    """`arus up`: returns the exit code (0 after Ctrl-C/SIGTERM, 1 when the stack cannot start)."""
    try:
        return Supervisor(settings, simulate=simulate, simulate_rate=simulate_rate, agency_rate=agency_rate).run()
    except EmbeddedServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold an exclusive lock on data_dir for the supervisor's life: one `arus up` per data dir."""
    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / "arus-up.lock", "a+b")  # noqa: SIM115 - kept open on purpose: it is the lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise EmbeddedServiceError(f"another `arus up` is running with {data_dir}; stop it first, "
                                   "or set ARUS_DATA_DIR to another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n".encode())
    f.flush()
    return f


def _mask(url: str) -> str:
    """The URL without its password, for printing."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
