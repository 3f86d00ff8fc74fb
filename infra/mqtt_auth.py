"""MQTT broker credentials and topic ACLs, generated from the device registry.

One format for every broker: mosquitto 2's password file (`user:$7$<iterations>$<b64 salt>$<b64
PBKDF2-SHA512>`) and ACL file (`user`/`topic`/`pattern` lines). The registry stores each device's
secret hash in exactly that form (infra/devices.py), so the password file is generated from the
registry without ever knowing a secret. amqtt (the embedded broker when mosquitto is not installed)
reads the same two files through infra/amqtt_auth.py, which uses the parsers below.

Rules (the public contract): a device (username = its id) may publish only under
`jember/v1/{id}/` and read only its own `jember/v1/{id}/errors`; the gateway's account reads every
device's telemetry and status and writes their errors topics; anonymous clients are refused.

Reload: files are replaced atomically (write a temporary file, fsync, rename) and only when their
content changes; then the broker gets SIGHUP (mosquitto re-reads both files and disconnects clients
whose credentials no longer match; the amqtt plugin re-reads them too).

Pure functions first (hashes, file texts, parsers, rule checks), then the registry queries and the
file/reload helpers. Imports nothing of ours but `schemas`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from schemas.errors import ConfigError

log = logging.getLogger("arus.mqtt_auth")

# The secrets are 192-bit random tokens (secrets.token_urlsafe(24)), not passwords people choose:
# no amount of key stretching changes what guessing 2^192 of them costs. The iteration count is
# therefore mosquitto_passwd's own default, which keeps what the broker pays small: it verifies on
# every CONNECT (a reconnect storm of every device after a broker restart) and re-verifies every
# connected client on each reload.
ITERATIONS = 101
SALT_BYTES = 12  # as mosquitto_passwd
HASH_PREFIX = "$7$"

GATEWAY_USER = "arus-gateway"
TOPIC_ROOT = "jember/v1"
# What every device may do, as mosquitto patterns (%u = the username = the device id).
DEVICE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("write", f"{TOPIC_ROOT}/%u/#"),
    ("read", f"{TOPIC_ROOT}/%u/errors"),
)
# The gateway: subscribes to every device's telemetry and status, answers on their errors topic.
GATEWAY_READ = (f"{TOPIC_ROOT}/+/telemetry", f"{TOPIC_ROOT}/+/status")
GATEWAY_WRITE = (f"{TOPIC_ROOT}/+/errors",)

PASSWD_NAME = "passwd"  # noqa: S105 - a file name
ACL_NAME = "acl"
_USERNAME_RE = re.compile(r"^[^\s:#+/]{1,128}$")


# --------------------------------------------------------------------------- hashes


def hash_secret(secret: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """mosquitto 2's `$7$` hash: PBKDF2-HMAC-SHA512 with a random salt, base64 (standard, padded)."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations)
    return f"{HASH_PREFIX}{iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def is_broker_hash(stored: str | None) -> bool:
    """True when `stored` is a well-formed `$7$` hash (usable in a mosquitto password file)."""
    return _parse_hash(stored) is not None


def _parse_hash(stored: str | None) -> tuple[int, bytes, bytes] | None:
    if not stored or not stored.startswith(HASH_PREFIX):
        return None
    parts = stored.split("$")
    if len(parts) != 5:
        return None
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except (ValueError, binascii.Error):
        return None
    if iterations < 1 or not salt or len(digest) != 64:
        return None
    return iterations, salt, digest


def verify_broker_hash(secret: str, stored: str | None) -> bool:
    parsed = _parse_hash(stored)
    if parsed is None:
        return False
    iterations, salt, digest = parsed
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, iterations), digest)


# --------------------------------------------------------------------------- accounts and file texts


@dataclass(frozen=True, slots=True)
class Account:
    """A privileged (non-device) broker user with its own topic rights."""

    username: str
    password_hash: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()


def gateway_account(username: str, secret: str, *, password_hash: str | None = None) -> Account:
    check_username(username)
    return Account(username, password_hash or hash_secret(secret), GATEWAY_READ, GATEWAY_WRITE)


def check_username(username: str) -> None:
    if not _USERNAME_RE.match(username):
        raise ConfigError(f"MQTT username {username!r} is not usable in a password file / ACL "
                          "(no spaces, ':', '#', '+' or '/')")


@dataclass(frozen=True, slots=True)
class AuthFiles:
    passwd: str
    acl: str
    devices: int  # devices in the password file
    skipped: tuple[str, ...] = ()  # active devices left out (no broker-format hash, reserved name)


def passwd_text(devices: Iterable[tuple[str, str | None]], accounts: Sequence[Account] = ()) -> AuthFiles:
    """The password file (and the ACL that goes with it) for active devices (id, secret_hash).

    Devices whose hash is not in the broker's format (registered before PBKDF2-SHA512; rotate them)
    and devices named like a privileged account are left out and reported in `skipped`.
    """
    reserved = {a.username for a in accounts}
    lines = [f"{a.username}:{a.password_hash}" for a in sorted(accounts, key=lambda a: a.username)]
    skipped = []
    count = 0
    for device_id, stored in sorted(devices):
        if device_id in reserved or not _USERNAME_RE.match(device_id) or not is_broker_hash(stored):
            skipped.append(device_id)
            continue
        lines.append(f"{device_id}:{stored}")
        count += 1
    return AuthFiles("\n".join(lines) + "\n" if lines else "", acl_text(accounts), count, tuple(skipped))


def acl_text(accounts: Sequence[Account] = ()) -> str:
    """mosquitto ACL: one block per privileged account, then the patterns every device gets."""
    out = ["# Generated by arus (infra/mqtt_auth.py) from the device registry; do not edit.", ""]
    for a in sorted(accounts, key=lambda a: a.username):
        out.append(f"user {a.username}")
        out += [f"topic read {t}" for t in a.read]
        out += [f"topic write {t}" for t in a.write]
        out.append("")
    out.append("# Every device (username = device id): its own topics only.")
    out += [f"pattern {access} {topic}" for access, topic in DEVICE_PATTERNS]
    return "\n".join(out) + "\n"


def generate(devices: Iterable[tuple[str, str | None]], accounts: Sequence[Account] = ()) -> AuthFiles:
    return passwd_text(devices, accounts)


# --------------------------------------------------------------------------- parsers and rule checks
# (what amqtt uses to enforce the same files; mosquitto has its own)


def parse_passwd(text: str) -> dict[str, str]:
    users = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if sep:
            users[user] = stored
    return users


@dataclass(frozen=True)
class Acl:
    """Parsed mosquitto ACL: per-user rules and patterns; each rule is (access, topic filter)."""

    users: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    patterns: tuple[tuple[str, str], ...] = ()
    anonymous: tuple[tuple[str, str], ...] = ()  # `topic` lines before any `user` line


_ACCESS = {"read", "write", "readwrite", "deny"}


def parse_acl(text: str) -> Acl:
    users: dict[str, list[tuple[str, str]]] = {}
    anonymous: list[tuple[str, str]] = []
    patterns: list[tuple[str, str]] = []
    current: list[tuple[str, str]] = anonymous
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user":
            current = users.setdefault(rest, [])
            continue
        if keyword not in ("topic", "pattern"):
            continue
        access, _, topic = rest.partition(" ")
        if access not in _ACCESS:  # `topic foo/bar` means readwrite
            access, topic = "readwrite", rest
        rule = (access, topic.strip())
        (patterns if keyword == "pattern" else current).append(rule)
    return Acl({u: tuple(r) for u, r in users.items()}, tuple(patterns), tuple(anonymous))


def filter_matches(pattern: str, topic: str) -> bool:
    """Does the ACL filter `pattern` cover `topic` (a topic name, or a subscription filter: then a
    `+` in it is covered only by `+` or `#` in the pattern, and a `#` only by `#`)?"""
    p_levels = pattern.split("/")
    t_levels = topic.split("/")
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(t_levels):
            return False
        t = t_levels[i]
        if p == "+":
            if t == "#":
                return False
            continue
        if p != t:
            return False
    return len(t_levels) == len(p_levels)


def allowed(acl: Acl, username: str | None, topic: str, access: str) -> bool:
    """mosquitto's default ACL check: `access` is 'read' (subscribe / receive) or 'write' (publish).

    A matching `deny` rule wins; anonymous clients get only the rules before the first `user` line;
    patterns apply to every authenticated user with %u / %c substituted (%u only for usernames that
    are safe in a topic level).
    """
    if topic.startswith("$"):
        return False
    if username is None:
        rules: Iterable[tuple[str, str]] = acl.anonymous
    else:
        expanded = []
        if _USERNAME_RE.match(username):
            expanded = [(a, t.replace("%u", username)) for a, t in acl.patterns if "%c" not in t]
        rules = [*acl.users.get(username, ()), *expanded]
    granted = False
    for rule_access, pattern in rules:
        if not filter_matches(pattern, topic):
            continue
        if rule_access == "deny":
            return False
        if rule_access == "readwrite" or rule_access == access:
            granted = True
    return granted


# --------------------------------------------------------------------------- the registry


def active_devices(conn: Any) -> list[tuple[str, str | None]]:
    """(device_id, secret_hash) of every device that is not revoked."""
    rows = conn.execute(
        "SELECT device_id, secret_hash FROM devices WHERE revoked_at IS NULL ORDER BY device_id"
    ).fetchall()
    return [(r[0], r[1]) for r in rows]


def registry_fingerprint(conn: Any) -> tuple[Any, ...]:
    """Changes whenever a device is added, revoked, rotated or deleted: an order-independent sum of
    row hashes over the columns that matter (a scan of `devices`: milliseconds for 10^4 devices)."""
    row = conn.execute(
        "SELECT count(*), coalesce(sum(hashtext(device_id || ':' || coalesce(secret_hash, '') || ':'"
        " || (revoked_at IS NULL)::text)::bigint), 0) FROM devices"
    ).fetchone()
    return tuple(row) if row else ()


# --------------------------------------------------------------------------- files and reload


def write_atomic(path: Path, text: str, *, mode: int = 0o600, owner: tuple[int, int] | None = None) -> bool:
    """Replace `path` with `text` (temp file, fsync, rename) unless it already holds exactly that.

    Returns True when the file changed. Readers (the broker) never see a half-written file.
    """
    path = Path(path)
    try:
        if path.read_text() == text:
            if owner is not None or (path.stat().st_mode & 0o777) != mode:
                _set_mode(path, mode, owner)
            return False
    except (FileNotFoundError, PermissionError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _set_mode(Path(tmp), mode, owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return True


def _set_mode(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    os.chmod(path, mode)  # first, while we still own it (no CAP_FOWNER needed)
    if owner is not None:
        os.chown(path, owner[0], owner[1])


def write_auth_files(
    out_dir: Path, files: AuthFiles, *, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> bool:
    """Write passwd and acl into out_dir; True when either changed. The ACL first: a new device's
    rights exist before it can log in, and a revoked one has lost its login before its rights go."""
    out_dir = Path(out_dir)
    changed = write_atomic(out_dir / ACL_NAME, files.acl, mode=mode, owner=owner)
    return write_atomic(out_dir / PASSWD_NAME, files.passwd, mode=mode, owner=owner) or changed


def pids_named(name: str, proc: Path = Path("/proc")) -> list[int]:
    """Pids whose command name (comm) is exactly `name` (e.g. the mosquitto of a shared PID namespace)."""
    found = []
    for comm in proc.glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                found.append(int(comm.parent.name))
        except (OSError, ValueError):
            continue
    return sorted(found)


def signal_broker(pids: Iterable[int], sig: int = signal.SIGHUP) -> list[int]:
    """Send `sig` (SIGHUP: reload) to each pid; returns the pids that got it."""
    sent = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except ProcessLookupError:
            continue
        except PermissionError:
            log.warning("not allowed to signal broker pid %d (run as its user or with CAP_KILL)", pid)
    return sent


@dataclass
class AuthSync:
    """Keeps a broker's password file and ACL equal to the registry, and reloads it on a change.

    `sync(conn)` is cheap when nothing changed (one fingerprint query); `force=True` regenerates
    anyway (files are rewritten and the broker reloaded only if the content differs).
    """

    out_dir: Path
    accounts: Sequence[Account]
    reload: Callable[[], object] | None = None
    mode: int = 0o600
    owner: tuple[int, int] | None = None
    _fingerprint: tuple[Any, ...] | None = None
    last: AuthFiles | None = None
    _warned: frozenset[str] = frozenset()

    def sync(self, conn: Any, *, force: bool = False) -> bool:
        fingerprint = registry_fingerprint(conn)
        if not force and fingerprint == self._fingerprint:
            return False
        files = generate(active_devices(conn), self.accounts)
        self._fingerprint = fingerprint
        self.last = files
        skipped = frozenset(files.skipped)
        if skipped - self._warned:
            log.warning("%d active device(s) left out of the broker's password file (hash from before "
                        "PBKDF2-SHA512, or a reserved name): %s; `arus devices rotate ID` fixes the first kind",
                        len(skipped), ", ".join(sorted(skipped)[:20]))
        self._warned = skipped
        changed = write_auth_files(self.out_dir, files, mode=self.mode, owner=self.owner)
        if changed:
            log.info("broker auth: %d device(s) + %d account(s) written to %s", files.devices,
                     len(self.accounts), self.out_dir)
            if self.reload is not None:
                self.reload()
        return changed


def watch(
    dsn: str,
    sync: AuthSync,
    *,
    interval: float = 1.0,
    full_every: float = 60.0,
    stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], Any] = time.sleep,
) -> None:
    """Poll the registry every `interval` s (and regenerate fully every `full_every` s) until `stop()`.

    A lost database connection is re-opened with the next poll; the files on disk stay as they were.
    """
    import psycopg

    conn: Any = None
    last_full = 0.0
    while not stop():
        try:
            if conn is None:
                conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
            now = time.monotonic()
            sync.sync(conn, force=now - last_full >= full_every)
            if now - last_full >= full_every:
                last_full = now
        except psycopg.Error as exc:
            log.warning("device registry not reachable (%s); retrying", exc)
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
        sleep(interval)
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


# --------------------------------------------------------------------------- URLs


def url_credentials(url: str | None) -> tuple[str | None, str | None]:
    if not url:
        return None, None
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return user, password


def with_credentials(url: str, username: str, password: str) -> str:
    """mqtt://host:port -> mqtt://username:password@host:port (both percent-encoded)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(username, safe='')}:{quote(password, safe='')}@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def load_or_create_secret(path: Path) -> str:
    """A random secret kept in `path` (mode 0600), created on first use."""
    path = Path(path)
    try:
        secret = path.read_text().strip()
        if secret:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return secret
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)
    return secret


# --------------------------------------------------------------------------- `arus mqtt-auth`


def reload_targets(
    signal_pids: Sequence[int] = (), pid_file: Path | None = None, process_name: str | None = None
) -> list[int]:
    """The broker pids to SIGHUP, looked up afresh each time (a restarted broker has a new pid)."""
    pids = list(signal_pids)
    if pid_file is not None:
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(Path(pid_file).read_text().split()[0]))
    if process_name:
        pids += pids_named(process_name)
    return sorted(set(pids))


def run_cli(
    dsn: str,
    mqtt_url: str | None,
    out_dir: Path,
    *,
    watch_changes: bool = False,
    interval: float = 1.0,
    signal_pids: Sequence[int] = (),
    pid_file: Path | None = None,
    process_name: str | None = None,
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
    stop: Callable[[], bool] = lambda: False,
    say: Callable[[str], None] = print,
) -> int:
    """Write the broker's passwd and acl into out_dir from the registry; with `watch_changes`, keep
    them current and SIGHUP the broker after each change (docker-compose runs this as a sidecar in
    mosquitto's PID namespace)."""
    import psycopg

    user, password = url_credentials(mqtt_url)
    accounts = []
    if user and password:
        accounts.append(gateway_account(user, password))
    else:
        say("warning: ARUS_MQTT_URL has no user:password, so no gateway account is written; "
            "the gateway will be refused by a broker that uses these files")

    def reload() -> None:
        pids = reload_targets(signal_pids, pid_file, process_name)
        sent = signal_broker(pids)
        if pids or signal_pids or pid_file or process_name:
            say(f"reload: SIGHUP sent to {sent or 'no broker process (not running yet?)'}")

    sync = AuthSync(Path(out_dir), accounts, reload=reload, mode=mode, owner=owner)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        sync.sync(conn, force=True)
    files = sync.last
    assert files is not None
    say(f"wrote {Path(out_dir) / PASSWD_NAME} ({files.devices} device(s), {len(accounts)} account(s)) "
        f"and {Path(out_dir) / ACL_NAME}")
    if not watch_changes:
        return 0
    say(f"watching the device registry every {interval:g}s")
    watch(dsn, sync, interval=interval, stop=stop)
    return 0
