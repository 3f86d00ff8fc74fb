"""PostgreSQL access and schema migrations.

Migrations are the files infra/migrations/NNN_name.sql, applied in order, each in its own transaction
and recorded in `schema_migrations`. A companion NNN_name.timescale.sql holds the TimescaleDB-only
part of the same step (hypertables, compression, ...) and runs only when the extension is present.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import conninfo

from schemas.errors import ConfigError, InfraError
from schemas.regions import load_regions

log = logging.getLogger(__name__)

# pg_advisory_lock key of `migrate` ("ARUS" in ASCII): two processes migrating at once queue up.
MIGRATION_LOCK_KEY = 0x41525553

_MIGRATION_RE = re.compile(r"^(\d{3})_([A-Za-z0-9_]+)\.sql$")
_TIMESCALE_RE = re.compile(r"^(\d{3})_([A-Za-z0-9_]+)\.timescale\.sql$")

# `timescale` records whether the step's .timescale.sql part ran, so a database that gains the
# extension later gets the TimescaleDB part of already-applied steps on the next migrate.
_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    timescale  boolean NOT NULL DEFAULT false
)
"""


def _with_timeout(dsn: str) -> str:
    # libpq waits forever for an unreachable host by default; a service should fail and say why.
    try:
        params = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid database URL: {exc}") from None
    if "connect_timeout" in params:
        return dsn
    return conninfo.make_conninfo(dsn, connect_timeout=10)


def connect(dsn: str, autocommit: bool = False) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(_with_timeout(dsn), autocommit=autocommit, application_name="arus")
    except psycopg.OperationalError as exc:
        raise InfraError(f"cannot connect to PostgreSQL: {exc}") from exc


async def aconnect(dsn: str, autocommit: bool = False) -> psycopg.AsyncConnection[Any]:
    try:
        return await psycopg.AsyncConnection.connect(
            _with_timeout(dsn), autocommit=autocommit, application_name="arus"
        )
    except psycopg.OperationalError as exc:
        raise InfraError(f"cannot connect to PostgreSQL: {exc}") from exc


def has_timescale(conn: psycopg.Connection[Any]) -> bool:
    """True when the timescaledb extension is installed in this database (not merely available)."""
    row = conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    return row is not None


def timescale_available(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
    return row is not None


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # e.g. "001_core"
    sql: str
    timescale_sql: str | None

    @property
    def checksum(self) -> str:
        # Both parts count: editing either after it shipped must be noticed.
        h = hashlib.sha256(self.sql.encode())
        if self.timescale_sql is not None:
            h.update(b"\0timescale\0")
            h.update(self.timescale_sql.encode())
        return h.hexdigest()


def _default_dir() -> Traversable:
    return resources.files("infra").joinpath("migrations")


def load_migrations(directory: Path | Traversable | None = None) -> list[Migration]:
    root = directory if directory is not None else _default_dir()
    plain: dict[int, tuple[str, str]] = {}
    timescale: dict[int, tuple[str, str]] = {}
    for entry in root.iterdir():
        if m := _TIMESCALE_RE.match(entry.name):
            target = timescale
        elif m := _MIGRATION_RE.match(entry.name):
            target = plain
        else:
            continue
        version = int(m.group(1))
        name = f"{m.group(1)}_{m.group(2)}"
        if version in target:
            raise ConfigError(f"two migrations share version {version:03d}: {target[version][0]} and {name}")
        target[version] = (name, entry.read_text("utf-8"))
    for version, (name, _) in timescale.items():
        if version not in plain or plain[version][0] != name:
            raise ConfigError(f"{name}.timescale.sql has no matching {name}.sql")
    return [
        Migration(v, name, sql, timescale.get(v, (name, None))[1])
        for v, (name, sql) in sorted(plain.items())
    ]


def _ensure_timescale(conn: psycopg.Connection[Any]) -> bool:
    if has_timescale(conn):
        return True
    if not timescale_available(conn):
        return False
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        # Available but not loadable (e.g. missing from shared_preload_libraries): plain path.
        log.warning("timescaledb is available but cannot be created (%s); using plain PostgreSQL", exc)
        return False
    return True


def _load_regions(conn: psycopg.Connection[Any]) -> None:
    # parent_code has no foreign key on purpose: the kabupaten's parent '35' (the province) is
    # outside the reference data, and regions stays exactly the shipped Jember list.
    rows = [(r.code, r.name, r.level, r.parent_code or None) for r in load_regions().values()]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO regions (code, name, level, parent_code) VALUES (%s, %s, %s, %s)
               ON CONFLICT (code) DO UPDATE
                 SET name = EXCLUDED.name, level = EXCLUDED.level, parent_code = EXCLUDED.parent_code
                 WHERE (regions.name, regions.level, regions.parent_code)
                       IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.level, EXCLUDED.parent_code)""",
            rows,
        )


def migrate(dsn: str, migrations_dir: Path | Traversable | None = None) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when up to date).

    Idempotent; raises ConfigError when an applied migration's file changed since it was applied.
    """
    migrations = load_migrations(migrations_dir)
    applied_now: list[str] = []
    with connect(dsn, autocommit=True) as conn:
        # Session-level lock, so every step below (including CREATE EXTENSION) is serialised.
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(_BOOKKEEPING)
            timescale = _ensure_timescale(conn)
            applied = {
                v: (name, checksum, ts)
                for v, name, checksum, ts in conn.execute(
                    "SELECT version, name, checksum, timescale FROM schema_migrations"
                ).fetchall()
            }
            _check_checksums(migrations, applied)
            for mig in migrations:
                if mig.version in applied:
                    if timescale and mig.timescale_sql and not applied[mig.version][2]:
                        with conn.transaction():
                            conn.execute(mig.timescale_sql)
                            conn.execute(
                                "UPDATE schema_migrations SET timescale = true WHERE version = %s",
                                (mig.version,),
                            )
                        log.info("applied the TimescaleDB part of %s", mig.name)
                    continue
                run_timescale = timescale and mig.timescale_sql is not None
                with conn.transaction():
                    conn.execute(mig.sql)  # no parameters: psycopg sends it as one multi-statement query
                    if run_timescale:
                        assert mig.timescale_sql is not None
                        conn.execute(mig.timescale_sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum, timescale)"
                        " VALUES (%s, %s, %s, %s)",
                        (mig.version, mig.name, mig.checksum, run_timescale),
                    )
                log.info("applied migration %s%s", mig.name, " (+timescale)" if run_timescale else "")
                applied_now.append(mig.name)
            _load_regions(conn)
        except psycopg.Error as exc:
            step = applied_now and f" after {applied_now[-1]}" or ""
            raise InfraError(f"migration failed{step}: {exc}") from exc
        finally:
            # Closing the session would release the lock too; unlocking keeps a pooled session clean.
            if not conn.closed and not conn.broken:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now


def _check_checksums(migrations: Iterable[Migration], applied: dict[int, tuple[str, str, bool]]) -> None:
    for mig in migrations:
        if mig.version not in applied:
            continue
        name, checksum, _ = applied[mig.version]
        if checksum != mig.checksum:
            raise ConfigError(
                f"migration {mig.name} was changed after it was applied to this database "
                f"(recorded {name} sha256 {checksum[:12]}, file {mig.checksum[:12]}); "
                "add a new migration instead of editing a shipped one"
            )
