"""Static checks of the Grafana provisioning (infra/deploy/grafana) and its use in docker-compose.yml:
valid YAML/JSON, one datasource from the environment, and every panel's SQL names only tables and
columns the migrations create (parsed from their CREATE TABLE statements)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.sensors import SENSOR_KINDS
from tests.sql_schema import grafana_sql, migration_tables

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "infra" / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
SQL_WORDS = {"select", "where", "on", "lateral", "unnest", "generate_series"}
_TABLE_REF = re.compile(r"\b(?:FROM|JOIN)\s+([a-z_][a-z0-9_]*)\b(?!\.)(?:\s+(?:AS\s+)?([a-z_][a-z0-9_]*))?", re.I)
_QUALIFIED = re.compile(r"\b([a-z_][a-z0-9_]*)\.([a-z_][a-z0-9_]*)\b", re.I)
_KEYWORDS = {"where", "on", "left", "join", "group", "order", "limit", "union", "inner", "cross", "using", "and"}


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return doc


def targets(dashboard: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append((f"variable {var['name']}", {"rawSql": var["query"], "datasource": var["datasource"]}))
    return out


@pytest.fixture(scope="module")
def compose_grafana() -> dict[str, Any]:
    svc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    return svc


def test_the_four_dashboards_exist() -> None:
    names = {p.stem for p in DASHBOARDS}
    assert names >= {"city-overview", "kecamatan-sensors", "alerts", "indicators"}
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def test_datasource_comes_from_the_environment(compose_grafana: dict[str, Any]) -> None:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "arus.yaml").read_text())
    [ds] = doc["datasources"]
    assert ds["type"] == "grafana-postgresql-datasource" and ds["uid"] == "arus-db"
    text = (GRAFANA / "provisioning" / "datasources" / "arus.yaml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    assert used >= {"GRAFANA_DB_HOST", "GRAFANA_DB_USER", "GRAFANA_DB_PASSWORD", "GRAFANA_DB_NAME"}
    env = compose_grafana["environment"]
    assert used <= set(env), f"set these in the grafana service: {used - set(env)}"
    assert "${" in env["GRAFANA_DB_PASSWORD"], "the password must come from .env"
    assert "password" in ds["secureJsonData"] and "password" not in ds.get("jsonData", {})


def test_compose_mounts_provisioning_and_dashboards(compose_grafana: dict[str, Any]) -> None:
    mounts = {v.split(":")[0]: v.split(":")[1] for v in compose_grafana["volumes"] if v.startswith("./")}
    assert mounts["./infra/deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "arus.yaml").read_text())["providers"][0]
    assert mounts["./infra/deploy/grafana/dashboards"] == provider["options"]["path"]
    assert "timescaledb" in compose_grafana["depends_on"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_is_well_formed(path: Path) -> None:
    d = load(path)
    assert d["title"] and d["uid"] and d["panels"]
    assert d["timezone"] == "Asia/Jakarta"
    ids = [p["id"] for p in d["panels"]]
    assert len(set(ids)) == len(ids)
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "arus-db" and t["rawQuery"] and t["rawSql"].strip()
            assert t["format"] in ("time_series", "table")
    used_vars = {m for _, t in targets(d) for m in re.findall(r"\$([a-z]+)\b", t["rawSql"])}
    used_vars |= {m for p in d["panels"] for m in re.findall(r"\$([a-z]+)\b", p["title"])}
    declared = {v["name"] for v in d["templating"]["list"]}
    assert used_vars <= declared, f"undeclared variables {used_vars - declared}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_panel_sql_names_existing_tables_and_columns(path: Path) -> None:
    schema = migration_tables()
    checked = 0
    for title, t in targets(load(path)):
        sql = grafana_sql(t["rawSql"])
        assert "$" not in sql, f"{title}: unsubstituted macro or variable in {sql}"
        assert "time_bucket" not in sql, f"{title}: use date_bin (plain PostgreSQL has no time_bucket)"
        aliases: dict[str, str] = {}
        for table, alias in _TABLE_REF.findall(sql):
            if table.lower() in SQL_WORDS:
                continue
            assert table in schema, f"{title}: table {table!r} is not created by any migration"
            aliases[table] = table
            if alias and alias.lower() not in _KEYWORDS:
                aliases[alias] = table
        for alias, column in _QUALIFIED.findall(sql):
            if alias not in aliases:
                continue
            assert column in schema[aliases[alias]], f"{title}: {aliases[alias]}.{column} does not exist"
            checked += 1
    assert checked > 0


def test_metric_variable_lists_every_metric() -> None:
    d = load(GRAFANA / "dashboards" / "kecamatan-sensors.json")
    [metric] = [v for v in d["templating"]["list"] if v["name"] == "metric"]
    listed = set(metric["query"].split(","))
    assert listed == {m for k in SENSOR_KINDS.values() for m in k.metrics}
