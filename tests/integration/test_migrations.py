"""infra.db.migrate against a real PostgreSQL: order, idempotence, checksums, concurrency, regions,
and the TimescaleDB path when the extension exists."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from infra.db import has_timescale, load_migrations, migrate
from schemas.errors import ConfigError, InfraError
from tests.helpers import pg_fetch, pg_scalar

# Everything that describes the schema; compared before and after a second migrate.
CATALOG_QUERIES = {
    "columns": """SELECT table_name, column_name, ordinal_position, data_type, is_nullable,
                         column_default, collation_name
                  FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 3""",
    "constraints": """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
                      FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2",
    "relations": """SELECT relname, relkind, relfilenode FROM pg_class
                    WHERE relnamespace = 'public'::regnamespace ORDER BY 1""",
    "extensions": "SELECT extname, extversion FROM pg_extension ORDER BY 1",
    "migrations": "SELECT version, name, checksum, applied_at, timescale FROM schema_migrations ORDER BY 1",
    # xmin changes when a row is rewritten: "changes nothing" includes the reference data
    "regions": "SELECT code, name, level, parent_code, xmin::text FROM regions ORDER BY code",
}


def catalog(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    return {name: pg_fetch(dsn, q) for name, q in CATALOG_QUERIES.items()}


@pytest.fixture
def empty_database_url(pg_server_url: str) -> Iterator[str]:
    """A brand-new, never-migrated database of this test alone."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_server_url.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def shipped_dir(tmp_path: Path) -> Path:
    """A copy of the shipped migrations that a test may edit."""
    src = resources.files("infra").joinpath("migrations")
    dst = tmp_path / "migrations"
    dst.mkdir()
    for entry in src.iterdir():
        if entry.name.endswith(".sql"):
            (dst / entry.name).write_text(entry.read_text("utf-8"), "utf-8")
    return dst


def test_migrate_twice_applies_everything_once_and_changes_nothing(empty_database_url: str) -> None:
    expected = [m.name for m in load_migrations()]
    assert expected and expected[0] == "001_core"
    assert migrate(empty_database_url) == expected
    before = catalog(empty_database_url)
    assert migrate(empty_database_url) == []
    after = catalog(empty_database_url)
    assert after == before
    versions = [row[0] for row in before["migrations"]]
    assert versions == sorted(versions) and len(versions) == len(expected)
    for table in ("devices", "regions", "readings", "aggregates", "dead_letters"):
        assert pg_scalar(empty_database_url, "SELECT to_regclass(%s)::text", (table,)) == table


def test_regions_are_the_shipped_reference(empty_database_url: str) -> None:
    migrate(empty_database_url)
    assert pg_scalar(empty_database_url, "SELECT count(*) FROM regions") == 280
    assert pg_scalar(empty_database_url, "SELECT count(*) FROM regions WHERE level = 'kecamatan'") == 31
    assert pg_fetch(empty_database_url, "SELECT name, level, parent_code FROM regions WHERE code = '35.09'") == [
        ("Kabupaten Jember", "kabupaten", "35")
    ]
    # every parent but the province exists (the province is outside the reference data, no FK)
    orphans = pg_fetch(
        empty_database_url,
        "SELECT r.code FROM regions r LEFT JOIN regions p ON p.code = r.parent_code WHERE p.code IS NULL",
    )
    assert orphans == [("35.09",)]
    # a hand-edited region is put back by the next migrate, and nothing else is rewritten
    pg_fetch(empty_database_url, "UPDATE regions SET name = 'X' WHERE code = '35.09.01'")
    migrate(empty_database_url)
    assert pg_scalar(empty_database_url, "SELECT name FROM regions WHERE code = '35.09.01'") == "Jombang"


def test_changed_migration_is_refused(empty_database_url: str, tmp_path: Path) -> None:
    mdir = shipped_dir(tmp_path)
    migrate(empty_database_url, mdir)
    core = mdir / "001_core.sql"
    core.write_text(core.read_text() + "\n-- edited after shipping\n")
    with pytest.raises(ConfigError, match="001_core was changed"):
        migrate(empty_database_url, mdir)
    # the timescale part counts too, even where the extension is absent
    core.write_text(core.read_text().replace("\n-- edited after shipping\n", ""))
    assert migrate(empty_database_url, mdir) == []
    ts = mdir / "001_core.timescale.sql"
    ts.write_text(ts.read_text() + "\n-- edited\n")
    with pytest.raises(ConfigError):
        migrate(empty_database_url, mdir)


def test_new_migration_is_applied_in_order_and_a_failing_one_leaves_nothing(
    empty_database_url: str, tmp_path: Path
) -> None:
    mdir = shipped_dir(tmp_path)
    migrate(empty_database_url, mdir)
    (mdir / "901_extra.sql").write_text("CREATE TABLE extra_a (x int);")
    (mdir / "902_broken.sql").write_text("CREATE TABLE extra_b (x int); SELECT no_such_function();")
    with pytest.raises(InfraError, match="no_such_function"):
        migrate(empty_database_url, mdir)
    # 901 committed in its own transaction; 902 rolled back entirely
    assert pg_scalar(empty_database_url, "SELECT to_regclass('extra_a')::text") == "extra_a"
    assert pg_scalar(empty_database_url, "SELECT to_regclass('extra_b')::text") is None
    assert pg_scalar(empty_database_url, "SELECT max(version) FROM schema_migrations") == 901
    (mdir / "902_broken.sql").write_text("CREATE TABLE extra_b (x int);")
    assert migrate(empty_database_url, mdir) == ["902_broken"]


def test_concurrent_migrations_are_serialised(empty_database_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(empty_database_url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    expected = [m.name for m in load_migrations()]
    assert sorted(results, key=len) == [[], [], [], expected]
    assert pg_scalar(empty_database_url, "SELECT count(*) FROM schema_migrations") == len(expected)
    assert pg_scalar(empty_database_url, "SELECT count(*) FROM regions") == 280


def test_timescale_path(empty_database_url: str) -> None:
    available = pg_scalar(empty_database_url, "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'")
    migrate(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        installed = has_timescale(conn)
    if not available:
        assert not installed
        assert pg_scalar(empty_database_url, "SELECT bool_or(timescale) FROM schema_migrations") is False
        pytest.skip("the timescaledb extension is not available on this PostgreSQL server "
                    "(pg_available_extensions); only the plain-PostgreSQL path can be checked here")
    if not installed:
        pytest.skip("timescaledb is available but could not be created (not in shared_preload_libraries?)")
    hypertables = {r[0] for r in pg_fetch(empty_database_url,
                                          "SELECT hypertable_name FROM timescaledb_information.hypertables")}
    assert {"readings", "aggregates"} <= hypertables
    assert pg_scalar(empty_database_url, "SELECT bool_and(timescale) FROM schema_migrations "
                                         "WHERE name IN ('001_core')") is True


def test_migrations_dir_is_packaged() -> None:
    names = [m.name for m in load_migrations()]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
