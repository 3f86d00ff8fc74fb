"""Record-sink converters of service events and daily cells: statements and refusals."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from consumers import service_rows as sr
from consumers.records import BadRecord

EVENT = {"id": "C-1-opened", "source": "lapor", "type": "jember.complaint.v1", "time": 1_795_838_400_000,
         "region": "35.09.19.1001", "kecamatan": "35.09.19", "entity_id": "C-1", "status": "opened",
         "category": "jalan_rusak", "agency": "dpupr", "durations": {}, "opened_at": 1_795_838_400_000,
         "data": {"complaint_id": "C-1", "reporter": {"nik": "hmac:" + "0" * 32}}, "part": 2, "offset": 41}


def test_event_row_and_entity_upsert() -> None:
    (ins, p1), (ups, p2) = sr.service_event_writes(dict(EVENT))
    assert ins == sr.INSERT_EVENT and ups == sr.UPSERT_ENTITY
    assert p1[0] == datetime(2026, 11, 28, 4, 0, tzinfo=UTC) and p1[-1] == 2  # ingest_partition
    assert '"hmac:' in p1[-2]
    assert p2[6] == p1[0] and p2[-1] == "{}"


def test_recount_per_part_and_type() -> None:
    writes = sr.service_event_writes({**EVENT, "recount": [["2026-08-20", "35.09.19", "jember.welfare.case.v1"]]})
    stmts = [w[0] for w in writes]
    assert stmts[2] == sr.LOCK_CELL and stmts[3] == sr.RECOUNT_STATUS and stmts[-1] == sr.TOTAL_DAY
    assert stmts.count(sr.RECOUNT_DURATION) == 3  # verify, assist, close
    assert writes[3][1][:5] == (date(2026, 8, 20), "35.09.19", "jember.welfare.case.v1", 2, 41)


def test_daily_part_then_total() -> None:
    msg = {"day": "2026-11-28", "kecamatan": "35.09.19", "type": "jember.complaint.v1", "measure": "status:opened",
           "count": 3, "sum": 0.0, "min": None, "max": None, "part": 1, "version": 77}
    (lock, _), (part, params), (total, tparams) = sr.service_daily_writes(msg)
    assert (lock, part, total) == (sr.LOCK_CELL, sr.UPSERT_PART, sr.TOTAL_CELL)
    assert params[4:6] == (1, 3) and params[-1] == 77 and tparams[-1] == "status:opened"


@pytest.mark.parametrize("bad", [
    {"time": "yesterday"}, {"entity_id": ""}, {"durations": {"x": "long"}}, {"recount": [["2026-13-01", "k"]]},
    {"recount": "all"}, {"part": "two"},
])
def test_malformed_events_are_refused(bad: dict) -> None:
    with pytest.raises(BadRecord):
        sr.service_event_writes({**EVENT, **bad})


@pytest.mark.parametrize("bad", [{"day": "today"}, {"count": -1}, {"count": True}, {"version": None}])
def test_malformed_cells_are_refused(bad: dict) -> None:
    msg = {"day": "2026-11-28", "kecamatan": "35.09.19", "type": "t", "measure": "m", "count": 1, "sum": 0.0,
           "part": 0, "version": 1}
    with pytest.raises(BadRecord):
        sr.service_daily_writes({**msg, **bad})
