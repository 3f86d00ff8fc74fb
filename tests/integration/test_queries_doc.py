"""Every plain-PostgreSQL ```sql block of docs/queries.md runs on a migrated database (blocks marked
```sql timescaledb need the extension and are skipped without it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from infra.db import connect, has_timescale

DOC = Path(__file__).resolve().parents[2] / "docs" / "queries.md"
BLOCK = re.compile(r"^```sql( timescaledb)?\n(.*?)^```", re.M | re.S)


def test_doc_has_both_variants() -> None:
    blocks = BLOCK.findall(DOC.read_text("utf-8"))
    assert any(ts for ts, _ in blocks) and sum(1 for ts, _ in blocks if not ts) >= 10
    text = DOC.read_text("utf-8")
    assert "date_bin(" in text and "time_bucket(" in text and "LIKE '35.09." in text


def test_every_query_of_the_doc_runs(fresh_database_url: str) -> None:
    blocks = BLOCK.findall(DOC.read_text("utf-8"))
    with connect(fresh_database_url, autocommit=True) as conn:
        timescale = has_timescale(conn)
        conn.execute("INSERT INTO devices (device_id, kind, region_code, last_seen) VALUES"
                     " ('q-1', 'water_level', '35.09.19.1001', now() - interval '2 hours')")
        conn.execute("INSERT INTO readings (time, device_id, region_code, metric, value, event_id) VALUES"
                     " (now() - interval '1 hour', 'q-1', '35.09.19.1001', 'waterLevel', 1.5, 'q-e1')")
        ran = 0
        for ts, sql in blocks:
            if ts and not timescale:
                continue
            try:
                rows = conn.execute(sql).fetchall()
            except Exception as exc:  # noqa: BLE001 - name the block
                pytest.fail(f"docs/queries.md block fails:\n{sql}\n{exc}")
            ran += 1
            if "DISTINCT ON (rd.device_id)" in sql:
                assert rows and rows[0][0] == "q-1" and rows[0][1] == "Mangli" and rows[0][2] == "Kaliwates"
    assert ran >= 10
