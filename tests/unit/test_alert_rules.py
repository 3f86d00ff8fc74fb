"""Alert rules as data: the shipped default, the YAML forms, and errors that name the rule and field."""

from __future__ import annotations

import pytest
import yaml

from arus.cli import main as arus_main
from consumers.alert_rows import convert
from consumers.records import BadRecord
from stream_processors.alerting.rules import (
    DEFAULT_RULES_FILE,
    AbsenceRule,
    AggregateRule,
    IndicatorRule,
    RateRule,
    RuleError,
    SlaRule,
    ThresholdRule,
    load_rules,
    parse_duration,
    parse_rules,
)


def one(rule: dict, **extra) -> object:
    return parse_rules({"rules": [rule], **extra}).rules[0]


def error_of(rule: dict) -> RuleError:
    with pytest.raises(RuleError) as info:
        parse_rules({"rules": [rule]})
    return info.value


def test_the_shipped_default_is_valid_and_covers_every_type():
    rs = load_rules(None)
    assert rs.source == str(DEFAULT_RULES_FILE)
    types = {type(r) for r in rs.rules}
    assert types == {ThresholdRule, RateRule, AbsenceRule, SlaRule, AggregateRule, IndicatorRule}
    river = rs.get("river-level")
    assert isinstance(river, ThresholdRule) and [lv.severity for lv in river.levels] == ["warning", "major", "critical"]
    pm = rs.get("pm25-ispu")
    assert isinstance(pm, AggregateRule) and pm.over == 3_600_000 and pm.levels[0].above == 55.4
    sla = rs.get("complaint-sla")
    assert isinstance(sla, SlaRule) and sla.within == 72 * 3_600_000 and sla.starts == ("opened",)


def test_the_product_brief_example_parses():
    doc = yaml.safe_load("""
rules:
  - id: river-siaga
    kind: water_level
    metric: waterLevel
    type: threshold
    levels:
      - {severity: warning,  above: 2.0, clear_below: 1.8}
      - {severity: critical, above: 3.0, clear_below: 2.8}
    for: 2
  - {id: gauge-silent, kind: water_level, type: absence, after: 10m, severity: major}
  - {id: complaint-sla, event: jember.complaint.v1, type: sla, start: opened, end: resolved,
     within: 72h, severity: warning}
""")
    rs = parse_rules(doc)
    siaga, silent, sla = rs.rules
    assert isinstance(siaga, ThresholdRule) and siaga.for_readings == 2 and siaga.for_ms == 0
    assert siaga.levels[1].clear == 2.8 and siaga.levels[1].direction == 1
    assert isinstance(silent, AbsenceRule) and silent.after == 600_000 and silent.severity == "major"
    assert isinstance(sla, SlaRule) and sla.ends == ("resolved",)


def test_shorthand_defaults_and_durations():
    r = one({"id": "x", "type": "threshold", "metric": "pm25", "severity": "major", "below": 5, "for": "2m"},
            defaults={"reopen_window": "5m", "max_reopens": 1})
    assert isinstance(r, ThresholdRule)
    assert r.levels[0].below == 5 and r.levels[0].clear == 5 and r.for_ms == 120_000
    assert r.reopen_window == 300_000 and r.max_reopens == 1 and r.flap_window == 3_600_000
    r2 = one({"id": "y", "type": "absence", "after": 90, "reopen_window": "1m"}, defaults={"reopen_window": "5m"})
    assert r2.after == 90_000 and r2.reopen_window == 60_000  # the rule's own value wins over defaults
    assert [parse_duration(x) for x in ("500ms", "90s", "10m", "2h", "3d", 1.5)] == [
        500, 90_000, 600_000, 7_200_000, 259_200_000, 1500]
    for bad in ("10 min", "", "-1s", 0, True, "1w"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_scope_matching_by_kind_device_and_region_prefix():
    r = one({"id": "x", "type": "threshold", "kind": "water_level", "region": "35.09.19", "metric": "waterLevel",
             "severity": "warning", "above": 1})
    assert r.matches_device("g", "water_level", "35.09.19.1001")
    assert r.matches_device("g", "water_level", "35.09.19")
    assert not r.matches_device("g", "water_level", "35.09.190")  # prefix by whole segments only
    assert not r.matches_device("g", "water_level", "35.09.20.1001")
    assert not r.matches_device("g", "air_quality", "35.09.19.1001")
    d = one({"id": "d", "type": "absence", "device": "g7", "after": "1m"})
    assert d.matches_device("g7", "noise", "35.09.01") and not d.matches_device("g8", "noise", "35.09.01")


@pytest.mark.parametrize(("rule", "field", "words"), [
    ({"id": "a", "type": "treshold"}, "type", "not one of"),
    ({"type": "absence", "after": "1m"}, "id", "needs an id"),
    ({"id": "a:b", "type": "absence", "after": "1m"}, "id", "no `:`"),
    ({"id": "a", "type": "absence"}, "after", "required"),
    ({"id": "a", "type": "absence", "after": "soon"}, "after", "not a duration"),
    ({"id": "a", "type": "absence", "after": "1m", "severity": "urgent"}, "severity", "'info'"),
    ({"id": "a", "type": "absence", "after": "1m", "kind": "volcano"}, "kind", "volcano"),
    ({"id": "a", "type": "absence", "after": "1m", "region": "Kaliwates"}, "region", "Kemendagri"),
    ({"id": "a", "type": "absence", "after": "1m", "colour": "red"}, "colour", "Extra inputs"),
    ({"id": "a", "type": "threshold", "kind": "water_level", "metric": "pm25", "severity": "info", "above": 1},
     "metric", "not a metric of kind water_level"),
    ({"id": "a", "type": "threshold", "metric": "speed", "severity": "info", "above": 1}, "metric", "not a known"),
    ({"id": "a", "type": "threshold", "metric": "pm25"}, "levels", "needs `levels`"),
    ({"id": "a", "type": "threshold", "metric": "pm25",
      "levels": [{"severity": "warning", "above": 2, "clear_below": 3}]}, "levels.0.clear_below", "must not exceed"),
    ({"id": "a", "type": "threshold", "metric": "pm25",
      "levels": [{"severity": "warning", "above": 2, "below": 1}]}, "levels.0.above", "exactly one"),
    ({"id": "a", "type": "threshold", "metric": "pm25",
      "levels": [{"severity": "critical", "above": 2}, {"severity": "warning", "above": 3}]}, "levels", "ascending"),
    ({"id": "a", "type": "threshold", "metric": "pm25",
      "levels": [{"severity": "warning", "above": 3}, {"severity": "critical", "above": 2}]}, "levels", "beyond"),
    ({"id": "a", "type": "threshold", "metric": "pm25",
      "levels": [{"severity": "warning", "above": 3}, {"severity": "critical", "below": 2}]}, "levels", "same way"),
    ({"id": "a", "type": "threshold", "metric": "pm25", "severity": "info", "above": 1, "for": 0}, "for", "at least"),
    ({"id": "a", "type": "threshold", "metric": "pm25", "severity": "info", "above": 1, "for": "often"}, "for",
     "not a duration"),
    ({"id": "a", "type": "rate", "metric": "waterLevel", "severity": "info", "above": 1}, "over", "required"),
    ({"id": "a", "type": "sla", "event": "jember.complaint.v1", "start": "opened", "end": "opened",
      "within": "1d"}, "end", "both start and end"),
    ({"id": "a", "type": "sla", "event": "complaint", "start": "opened", "end": "resolved", "within": "1d"},
     "event", "event type"),
    ({"id": "a", "type": "sla", "kind": "noise", "event": "jember.complaint.v1", "start": "opened",
      "end": "resolved", "within": "1d"}, "kind", "not kind/device"),
    ({"id": "a", "type": "aggregate", "metric": "pm25", "over": "1h", "device": "x", "severity": "info",
      "above": 1}, "device", "per kecamatan"),
    ({"id": "a", "type": "aggregate", "metric": "pm25", "over": "1h", "agg": "median", "severity": "info",
      "above": 1}, "agg", "'mean'"),
])
def test_errors_name_the_rule_and_the_field(rule, field, words):
    err = error_of(rule)
    assert err.field == field, str(err)
    assert err.rule_id == str(rule.get("id", "#1"))
    assert words in str(err)


def test_file_level_errors(tmp_path):
    with pytest.raises(RuleError, match="duplicate rule id"):
        parse_rules({"rules": [{"id": "a", "type": "absence", "after": "1m"}] * 2})
    with pytest.raises(RuleError, match="unknown top-level key"):
        parse_rules({"rules": [], "rulez": []})
    with pytest.raises(RuleError, match="defaults may set only"):
        parse_rules({"rules": [], "defaults": {"severity": "info"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [ {id: x\n")
    with pytest.raises(RuleError, match="not valid YAML") as info:
        load_rules(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(RuleError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")
    assert parse_rules(None).rules == ()


def test_cli_rules_check(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("rules:\n  - {id: g, kind: noise, metric: LAeq, type: threshold, severity: warning, above: 70}\n")
    assert arus_main(["rules", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "1 rules, valid" in out and "g " in out and "LAeq: warning > 70" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {id: b, kind: noise, metric: pm25, type: threshold, severity: warning, above: 70}\n")
    assert arus_main(["rules", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "rule 'b'" in err and "field 'metric'" in err
    assert arus_main(["rules", "check"]) == 0  # the shipped default
    assert "river-level" in capsys.readouterr().out


def _msg(**over):
    alert = {"id": "r:g1:1000", "rule_id": "r", "entity": "g1", "kind": "water_level", "region_code": "35.09.19.1001",
             "kecamatan": "35.09.19", "metric": "waterLevel", "severity": "warning", "state": "open", "value": 2.5,
             "message": "m", "opened_at": 1000, "updated_at": 1000, "acknowledged_at": None,
             "acknowledged_by": None, "resolved_at": None, "resolved_by": None, "trigger_event": "g1/1000",
             "version": 1}
    event = {"dedup": "r:g1:1000:1", "transition": "opened", "time": 1000, "severity": "warning", "state": "open",
             "actor": "stream", "value": 2.5, "note": None}
    alert.update(over.pop("alert", {}))
    event.update(over.pop("event", {}))
    return {"alert": alert, "event": event}


def test_sink_converter_builds_the_upsert_and_the_event_and_refuses_garbage():
    (up, params), (ins, ev) = convert(_msg())
    assert up.startswith("INSERT INTO alerts") and "WHERE a.version < EXCLUDED.version" in up
    assert params["id"] == "r:g1:1000" and params["version"] == 1 and params["reopened"] is False
    assert params["opened_at"].tzinfo is not None
    assert ins.startswith("INSERT INTO alert_events") and "ON CONFLICT (dedup) DO NOTHING" in ins
    assert ev[0] == "r:g1:1000:1" and ev[3] == "opened" and ev[6] == "stream"
    assert convert(_msg(event={"transition": "reopened"}))[0][1]["reopened"] is True
    for bad in (_msg(alert={"severity": "urgent"}), _msg(event={"transition": "exploded"}),
                _msg(alert={"version": -1}), _msg(alert={"opened_at": "yesterday"}), _msg(alert={"id": None}),
                _msg(event={"dedup": ""}), _msg(alert={"value": "high"}), {"alert": {}}):
        with pytest.raises(BadRecord):
            convert(bad)
