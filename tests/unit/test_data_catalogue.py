"""The data catalogue (docs/data-catalogue.json) and dictionary (docs/data-dictionary.md) describe
EVERY table and column the migrations create, with Satu Data metadata. A migration that adds a column
fails this test until the column is described: a deliberate guard."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from infra import db
from schemas.sensors import SENSOR_KINDS
from tests.sql_schema import _split_top, migration_tables, parse_tables

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "docs" / "data-catalogue.json"
DICTIONARY = ROOT / "docs" / "data-dictionary.md"
TABLE_FIELDS = ("definition", "source_agency", "update_frequency", "access", "granularity", "primary_key", "columns")
COLUMN_FIELDS = ("definition", "type", "unit", "personal_data")


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(CATALOGUE.read_text("utf-8"))
    return doc


def schema() -> dict[str, list[str]]:
    tables = migration_tables()
    parse_tables(db._BOOKKEEPING, tables)  # schema_migrations, created by the migration runner
    return tables


def test_every_table_and_column_is_described(catalogue: dict[str, Any]) -> None:
    described = catalogue["tables"]
    missing = []
    for table, columns in schema().items():
        if table not in described:
            missing.append(f"table {table}")
            continue
        missing += [f"{table}.{c}" for c in columns if c not in described[table]["columns"]]
    assert not missing, ("describe these in docs/data-catalogue.json and docs/data-dictionary.md: "
                         + ", ".join(missing))


def test_nothing_described_that_does_not_exist(catalogue: dict[str, Any]) -> None:
    tables = schema()
    stale = [t for t in catalogue["tables"] if t not in tables]
    stale += [f"{t}.{c}" for t, spec in catalogue["tables"].items() if t in tables
              for c in spec["columns"] if c not in tables[t]]
    assert not stale, f"described but not in any migration: {stale}"


def test_satu_data_metadata_is_complete(catalogue: dict[str, Any]) -> None:
    classes = set(catalogue["personal_data_classes"])
    assert {"none", "pseudonymised", "credential"} <= classes
    for name, spec in catalogue["tables"].items():
        for field in TABLE_FIELDS:
            assert spec.get(field), f"{name}: no {field}"
        assert spec["access"].split()[0] in catalogue["access_levels"], name
        assert set(spec["primary_key"]) <= set(spec["columns"]), name
        for col, c in spec["columns"].items():
            for field in COLUMN_FIELDS:
                assert field in c, f"{name}.{col}: no {field}"
            assert len(c["definition"]) >= 8, f"{name}.{col}: definition too short"
            assert c["personal_data"] in classes, f"{name}.{col}: unknown class {c['personal_data']}"
            if "references" in c and c["references"] != "metrics":
                ref_table, ref_col = c["references"].split(".")
                assert ref_col in catalogue["tables"][ref_table]["columns"], f"{name}.{col} references {c['references']}"


def test_secrets_and_personal_fields_are_classified(catalogue: dict[str, Any]) -> None:
    t = catalogue["tables"]
    for table, col in (("devices", "secret_hash"), ("agencies", "key_hash"), ("operators", "token_hash")):
        assert t[table]["columns"][col]["personal_data"] == "credential"
    assert t["service_events"]["columns"]["data"]["personal_data"] == "pseudonymised"
    for name, spec in t.items():
        for col, c in spec["columns"].items():
            if re.search(r"hash|secret|token", col):
                assert c["personal_data"] == "credential", f"{name}.{col}"


def test_metrics_match_the_sensor_catalogue(catalogue: dict[str, Any]) -> None:
    units = {m.name: m.unit for k in SENSOR_KINDS.values() for m in k.metrics.values()}
    assert {n: m["unit"] for n, m in catalogue["metrics"].items()} == units


def test_dictionary_has_every_table_and_column(catalogue: dict[str, Any]) -> None:
    text = DICTIONARY.read_text("utf-8")
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    by_table = {s.split("\n", 1)[0].strip(): s for s in sections}
    for table, columns in schema().items():
        assert table in by_table, f"docs/data-dictionary.md has no section ### {table}"
        for c in columns:
            assert f"| `{c}` |" in by_table[table], f"docs/data-dictionary.md: {table}.{c} missing"
    for metric in catalogue["metrics"]:
        assert f"| `{metric}` |" in text


def test_continuous_aggregates_have_the_rollup_tables_columns() -> None:
    """On TimescaleDB the rollups are views of the same name: same columns, so every query works on both."""
    text = resources.files("infra").joinpath("migrations/005_rollups.timescale.sql").read_text("utf-8")
    plain = schema()
    views = re.findall(r"CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+)\s.*?\bAS\s+SELECT(.*?)\bFROM\b", text, re.S)
    assert {v for v, _ in views} == {"rollup_hourly", "rollup_daily"}
    for view, select in views:
        cols = [re.findall(r"(\w+)\s*$", item.strip())[0] for item in _split_top(select)]
        assert cols == plain[view], view
