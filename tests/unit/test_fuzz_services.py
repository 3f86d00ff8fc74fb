"""Fuzzing agency ingest with hypothesis: HTTP bodies (JSON, arrays, NDJSON, bytes) through the
endpoint's body parsing and per-item preparation, and CSV files through `arus import-csv --dry-run`:
over 10,000 generated inputs in all. Nothing raises; every item ends accepted or rejected with a known
reason; accepted events carry no NIK, name or phone in clear; a valid event among garbage is accepted."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.settings import Settings
from producers.agency_http import parse_body
from producers.csv_import import import_csv
from producers.service_ingest import prepare
from schemas import reasons
from schemas.results import Rejected
from schemas.service_events import synthetic_nik

NOW_MS = int(time.time() * 1000)
KEY = b"fuzz-pii-key"
NIK = synthetic_nik("35.09.19", 17, 8, 1985, 7)
FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
VALID = {
    "specversion": "1.0", "id": "c-1", "source": "lapor.jember.go.id", "type": "jember.complaint.v1",
    "time": "2026-11-28T09:00:00+07:00", "region": "35.09.19", "subject": "c-1",
    "data": {"complaint_id": "c-1", "status": "opened", "category": "jalan_rusak", "agency": "dpu",
             "channel": "web", "person": {"nik": NIK, "name": "Siti Aminah", "phone": "081234567890"}},
}

leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64),
                 st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30),
                 st.sampled_from([NIK, "3509" + "0" * 12, "' OR 1=1 --", "35.99.99", "PMKS99", "opened",
                                  "resolved", "2026-11-28T09:00:00+07:00", "9999-01-01T00:00:00Z"]))
json_value = st.recursive(leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=15)
mutations = st.dictionaries(st.sampled_from(list(VALID) + ["extra"]), json_value, max_size=3)
data_mutations = st.dictionaries(st.sampled_from(list(VALID["data"]) + ["extra"]), json_value, max_size=3)


def _event(top: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {**VALID, **top, "data": {**VALID["data"], **data}}


def _check_items(body: bytes, content_type: str) -> list[str]:
    parsed = parse_body(body, content_type)
    if isinstance(parsed, Rejected):
        assert parsed.reason in reasons.ALL and parsed.message
        return [parsed.reason]
    outcomes = []
    for item, _raw, failure in parsed:
        if failure is not None:
            outcomes.append(failure.reason)
            continue
        result = prepare(item, KEY, NOW_MS, agency="fuzz", channel="http")
        if isinstance(result, Rejected):
            assert result.reason in reasons.ALL and result.message, result
            assert NIK not in result.message, "a rejection message must not echo a NIK"
            outcomes.append(result.reason)
        else:
            value = result.value.value.decode()
            for clear in (NIK, "Siti Aminah", "081234567890"):
                assert clear not in value, f"{clear!r} left in clear"
            outcomes.append("accepted")
    return outcomes


@FUZZ
@given(st.binary(max_size=3000), st.sampled_from(["application/json", "application/x-ndjson", "text/plain"]))
def test_random_bodies(body: bytes, ctype: str) -> None:
    _check_items(body, ctype)


@FUZZ
@given(st.lists(st.tuples(mutations, data_mutations), min_size=1, max_size=5), st.booleans())
def test_mutated_events_as_array_or_ndjson_and_valid_ones_still_pass(items: list, ndjson: bool) -> None:
    events = [_event(top, data) for top, data in items] + [VALID]

    def dump(e: dict[str, Any]) -> bytes:  # json, not orjson: clients send integers beyond 64 bits too
        return json.dumps(e, default=str).encode()

    body = b"\n".join(dump(e) for e in events) if ndjson else b"[" + b",".join(dump(e) for e in events) + b"]"
    outcomes = _check_items(body, "application/x-ndjson" if ndjson else "application/json")
    assert len(outcomes) == len(events)
    assert outcomes[-1] == "accepted", "the valid event after the garbage is accepted"


cell = st.one_of(st.text(max_size=25), st.sampled_from([NIK, "Kaliwates", "35.09.19", "opened", "resolved",
                                                       "28/11/2026 09:00", "2026-11-28 09:00 WIB", '"', ";", "\n"]))


@settings(max_examples=4000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.lists(cell, min_size=0, max_size=8), min_size=1, max_size=6), st.sampled_from([",", ";"]))
def test_csv_files_import_or_reject_every_row(tmp_path_factory: Any, rows: list[list[str]], sep: str) -> None:
    import csv
    import io

    header = ["complaint_id", "status", "time", "kecamatan", "category", "agency", "channel", "nik_pelapor"]
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=sep)
    writer.writerow(header)
    writer.writerows(rows)
    path = Path(tmp_path_factory.mktemp("csv")) / "fuzz.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    report = path.with_suffix(".rejects.csv")
    result = import_csv(Settings(pii_key="fuzz-pii-key"), path, "jember.complaint.v1", dry_run=True,  # type: ignore[arg-type]
                        report_path=report, progress=False, now_ms=lambda: NOW_MS)
    assert result.accepted + result.rejected == result.rows
    assert set(result.reasons) <= set(reasons.ALL)
    if result.rejected:
        text = report.read_text(encoding="utf-8")
        assert NIK not in text, "the reject report masks personal columns"
