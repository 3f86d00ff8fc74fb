"""Pure parts of the alerts HTTP side: filters (SQL and in-stream), the SSE message, operator tokens."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from fastapi import HTTPException

from arus.routes.alerts import AlertFilter, command_envelope, sse_frame, stream_message
from infra.devices import hash_secret
from infra.operators import Auth, check_token, token_name
from schemas.alerts import COMMAND_TYPE

T = datetime(2026, 11, 28, 4, 17, 57, 123000, tzinfo=UTC)


def parse(**kw: str | None) -> AlertFilter:
    args = {k: kw.get(k) for k in ("state", "severity", "kecamatan", "kind", "rule", "region", "since", "until")}
    return AlertFilter.parse(**args, default_states=("open", "acknowledged"))  # type: ignore[arg-type]


def alert(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"id": "a1", "rule_id": "river", "entity": "g1", "kind": "water_level",
                               "region_code": "35.09.19.1004", "kecamatan": "35.09.19", "kecamatan_name": "Kaliwates",
                               "severity": "warning", "state": "open"}
    base.update(kw)
    return base


def test_filter_defaults_and_minimum_severity() -> None:
    f = parse()
    assert f.states == ("open", "acknowledged") and f.severities is None
    assert parse(state="all").states is None
    assert parse(severity="major").severities == ("major", "critical")
    assert parse(state="resolved,open").states == ("resolved", "open")


@pytest.mark.parametrize("kw", [{"state": "closed"}, {"severity": "high"}, {"since": "yesterday"}])
def test_filter_refuses_bad_values(kw: dict[str, str]) -> None:
    with pytest.raises(HTTPException) as exc:
        parse(**kw)
    assert exc.value.status_code == 422


def test_filter_sql_escapes_region_prefix_and_treats_naive_times_as_utc() -> None:
    f = parse(region="35.09_1%", since="2026-11-28T04:00:00")
    where, params = f.sql()
    assert "a.region_code LIKE %s" in where and "35.09\\_1\\%%" in params
    assert datetime(2026, 11, 28, 4, tzinfo=UTC) in params


def test_filter_matches_stream_alerts_like_the_sql() -> None:
    f = AlertFilter.parse(None, "major", "kaliwates", "water_level", None, "35.09.19", None, None, default_states=None)
    assert not f.matches(alert())  # warning < major
    assert f.matches(alert(severity="critical", state="resolved"))  # no state filter on the stream by default
    assert not f.matches(alert(severity="critical", kecamatan="35.09.20", kecamatan_name="Patrang"))
    assert not f.matches(alert(severity="critical", kind="air_quality"))
    assert not f.matches(alert(severity="critical", region_code="35.09.20.1007"))
    assert AlertFilter().matches(None) and not f.matches(None)


def joined(**alert_kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "e_seq": 42, "e_dedup": "a1:3", "e_alert_id": "a1", "e_time": T, "e_transition": "escalated",
        "e_severity": "critical", "e_state": "open", "e_actor": "stream", "e_value": 3.4, "e_note": None}
    a = {"id": "a1", "rule_id": "river", "entity": "g1", "kind": "water_level", "region_code": "35.09.19.1004",
         "kecamatan": "35.09.19", "metric": "waterLevel", "severity": "critical", "state": "acknowledged",
         "value": 3.6, "message": "", "opened_at": T, "updated_at": T, "acknowledged_at": T,
         "acknowledged_by": "sari", "resolved_at": None, "resolved_by": None, "trigger_event": "e", "version": 4,
         "kecamatan_name": "Kaliwates"}
    a.update(alert_kw)
    row.update({f"a_{k}": v for k, v in a.items()})
    return row


def test_stream_message_takes_the_transition_severity_and_the_stored_state() -> None:
    msg = stream_message(joined(severity="warning"))
    assert msg["seq"] == 42 and msg["event"]["transition"] == "escalated"
    assert msg["alert"]["severity"] == "critical" and msg["alert"]["value"] == 3.4
    assert msg["alert"]["state"] == "acknowledged" and msg["alert"]["acknowledged_by"] == "sari"
    assert msg["alert"]["opened_at"] == "2026-11-28T04:17:57.123Z"
    assert msg["alert"]["opened_at_wib"] == "2026-11-28 11:17:57 WIB" and msg["event"]["time_wib"].endswith("WIB")
    frame = sse_frame(msg).decode()
    head, data = frame.split("data: ")
    assert head == "id: 42\nevent: escalated\n" and frame.endswith("\n\n")
    assert orjson.loads(data)["event"]["seq"] == 42


def test_stream_message_of_an_event_without_its_alert_row() -> None:
    msg = stream_message(joined(id=None))
    assert msg["alert"] is None and msg["event"]["alert_id"] == "a1"


def test_command_envelope_is_a_cloudevent_keyed_to_the_alert() -> None:
    env = command_envelope("ack", "sari", alert(), "c-1", T, None)
    assert env["specversion"] == "1.0" and env["type"] == COMMAND_TYPE and env["source"] == "arus-api"
    assert env["id"] == "c-1" and env["subject"] == "a1" and env["region"] == "35.09.19.1004"
    assert env["time"] == "2026-11-28T04:17:57.123+00:00"
    assert env["data"] == {"action": "ack", "actor": "sari", "alert_id": "a1", "rule_id": "river", "entity": "g1",
                           "command_id": "c-1", "note": None}


def test_operator_tokens() -> None:
    assert token_name("budi.bpbd.Zx_9-a") == "budi.bpbd"
    assert token_name("nodot") is None and token_name("budi.") is None and token_name(".secret") is None
    token = "budi.bpbd.s3cr3t-value"
    stored = hash_secret(token)
    assert check_token(token, stored, revoked=False) is Auth.OK
    assert check_token(token, stored, revoked=True) is Auth.REVOKED
    assert check_token(token + "x", stored, revoked=False) is Auth.INVALID
    assert check_token(token, None, revoked=False) is Auth.INVALID
