"""Every Grafana panel and variable query runs on a migrated PostgreSQL (plain: date_bin), with the
macros Grafana substitutes, over a short and a long range (the two-source panels pick another table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infra.db import connect
from tests.sql_schema import grafana_sql

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "infra/deploy/grafana/dashboards").glob("*.json"))


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_dashboard_query_runs(fresh_database_url: str, path: Path) -> None:
    d = json.loads(path.read_text())
    queries = [(p["title"], t["rawSql"]) for p in d["panels"] for t in p["targets"]]
    queries += [(v["name"], v["query"]) for v in d["templating"]["list"] if v["type"] == "query"]
    with connect(fresh_database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO devices (device_id, kind, region_code, status) VALUES"
                     " ('g-1', 'water_level', '35.09.19.1001', 'online')")
        conn.execute("""INSERT INTO aggregates (bucket, scope, key, region_code, metric, bucket_end, count, min, max,
                        sum, mean, last, last_time) VALUES
                        ('2026-03-01T01:00Z', 'kecamatan', '35.09.19', '35.09.19', 'waterLevel', '2026-03-01T01:01Z',
                         2, 1, 2, 3, 1.5, 2, '2026-03-01T01:00:30Z')""")
        for title, raw in queries:
            for long_range in (False, True):
                try:
                    conn.execute(grafana_sql(raw, long_range)).fetchall()
                except Exception as exc:  # noqa: BLE001 - name the panel
                    pytest.fail(f"{path.stem} / {title} (long range: {long_range}): {exc}")
        if path.stem == "city-overview":
            [level] = [raw for title, raw in queries if title.startswith("River water level")]
            rows = conn.execute(grafana_sql(level)).fetchall()
            assert [(r[1], r[2]) for r in rows] == [("Kaliwates", 2.0)]
            assert conn.execute(grafana_sql(level, long_range=True)).fetchall() == []  # rollup_hourly: empty
