"""Alert evaluation and lifecycle without Kafka: readings through the real TelemetryPartition with the
AlertHandler plugged in as the worker does, timers driven by the checkpoint clock, state across restore."""

from __future__ import annotations

from types import SimpleNamespace

import orjson
import pytest

from schemas import reasons
from schemas.alerts import COMMAND_TYPE, command_dedup
from schemas.envelope import TELEMETRY_TYPE
from stream_processors.alerting.handler import AlertHandler, RegionAlerts
from stream_processors.alerting.rules import parse_rules
from stream_processors.outputs import Outputs
from stream_processors.region_merge import RegionMergePartition
from stream_processors.telemetry import TelemetryPartition
from stream_processors.validation import TimePolicy
from tests.helpers import Dev

T0 = 1_790_000_040_000
MIN = 60_000
POLICY = TimePolicy(max_age_ms=10**12, max_future_ms=10**12)

RULES = {
    "defaults": {"reopen_window": "10m", "max_reopens": 2, "flap_window": "1h"},
    "rules": [
        {"id": "river", "kind": "water_level", "metric": "waterLevel", "type": "threshold", "for": 2,
         "levels": [{"severity": "warning", "above": 2.0, "clear_below": 1.8},
                    {"severity": "critical", "above": 3.0, "clear_below": 2.8}]},
        {"id": "rising", "kind": "water_level", "metric": "waterLevel", "type": "rate", "over": "10m",
         "severity": "major", "above": 0.5, "clear_below": 0.2},
        {"id": "silent", "kind": "water_level", "type": "absence", "after": "10m", "severity": "major"},
        {"id": "complaint-sla", "event": "jember.complaint.v1", "type": "sla", "start": "opened",
         "end": "resolved", "within": "72h", "severity": "warning"},
        {"id": "pm25-hour", "metric": "pm25", "type": "aggregate", "agg": "mean", "over": "1h",
         "levels": [{"severity": "warning", "above": 55.4, "clear_below": 45}]},
    ],
}


REG = {
    "g1": Dev("g1", "water_level", "35.09.19.1001"),
    "g2": Dev("g2", "water_level", "35.09.20.2001"),
    "aq": Dev("aq", "air_quality", "35.09.19.1002"),
    "bin": Dev("bin", "waste_container", "35.09.19.1002"),
}


class Worker:
    """One ingest partition as app.py assembles it (alerts part only), with a fake wall clock."""

    def __init__(self, rules: dict | None = None) -> None:
        self.ruleset = parse_rules(rules or RULES)
        self.part = TelemetryPartition(0, "jember.ingest", MIN, 20 * MIN, POLICY, lambda: REG)
        self.alerts = AlertHandler(self.ruleset, 0, "jember.ingest", lambda: self.part.watermark)
        self.part.handlers[COMMAND_TYPE] = self.alerts
        self.part.observers.append(self.alerts)
        self.out = Outputs()
        self.offset = 0
        self.wall = T0

    def feed(self, raw: bytes) -> None:
        self.part.process(raw, self.offset, self.wall, self.out)
        self.part.offset = self.offset
        self.offset += 1

    def reading(self, device: str, t: int, **values: float) -> None:
        self.feed(orjson.dumps({"specversion": "1.0", "id": f"{device}/{t}", "source": f"/jember/v1/{device}",
                                "type": TELEMETRY_TYPE, "time": t, "subject": device, "data": {"values": values}}))

    def command(self, action: str, alert: dict, actor: str = "budi", command_id: str = "c1") -> None:
        self.feed(orjson.dumps({"specversion": "1.0", "id": command_id, "source": "/api", "type": COMMAND_TYPE,
                                "time": self.wall, "subject": alert["entity"],
                                "data": {"action": action, "actor": actor, "alert_id": alert["id"],
                                         "rule_id": alert["rule_id"], "entity": alert["entity"],
                                         "command_id": command_id}}))

    def flush(self, wall: int | None = None) -> None:
        if wall is not None:
            self.wall = wall
        self.part.flush(self.out, self.wall)

    def alerts_out(self, rule: str | None = None) -> list[dict]:
        msgs = [orjson.loads(v) for t, _, v in self.out.records if t == "alerts"]
        return [m for m in msgs if rule is None or m["alert"]["rule_id"] == rule]


def transitions(msgs: list[dict]) -> list[tuple[str, str]]:
    return [(m["event"]["transition"], m["event"]["severity"]) for m in msgs]


def test_noisy_flood_opens_one_alert_per_gauge_escalates_and_resolves_below_clear():
    w = Worker()
    # rising through the levels, with noise; g2 follows 0.2 m lower
    levels = [1.0, 1.5, 1.9, 2.05, 1.95, 2.1, 2.15, 2.3, 2.6, 2.9, 3.05, 2.95, 3.1, 3.2, 3.4, 3.1, 2.9,
              2.85, 2.9, 2.7, 2.5, 2.2, 1.95, 2.05, 1.85, 2.1, 1.9, 1.82, 1.7, 1.5, 1.2]
    for i, lv in enumerate(levels):
        t = T0 + i * MIN
        w.reading("g1", t, waterLevel=lv)
        w.reading("g2", t + 1000, waterLevel=lv - 0.2)
    msgs = w.alerts_out("river")
    by_gauge = {}
    for m in msgs:
        by_gauge.setdefault(m["alert"]["entity"], []).append(m)
    assert set(by_gauge) == {"g1", "g2"}
    for gauge, ms in by_gauge.items():
        assert len({m["alert"]["id"] for m in ms}) == 1, f"{gauge}: exactly one alert"
        assert ms[0]["alert"]["id"].startswith(f"river:{gauge}:")
    # g1: warning after two readings above 2.0 (2.05 then 1.95 breaks the streak; 2.1, 2.15), critical after two
    # above 3.0 (3.05, 2.95 breaks; 3.1, 3.2); back to warning under 2.8 (2.7); hovering 1.85-2.1 stays
    # warning (above the 1.8 clear level); resolved at 1.7
    assert transitions(by_gauge["g1"]) == [("opened", "warning"), ("escalated", "critical"),
                                           ("deescalated", "warning"), ("resolved", "warning")]
    opened, resolved = by_gauge["g1"][0], by_gauge["g1"][-1]
    assert opened["alert"]["opened_at"] == T0 + 6 * MIN and opened["alert"]["trigger_event"] == f"g1/{T0 + 6 * MIN}"
    assert resolved["alert"]["state"] == "resolved" and resolved["alert"]["resolved_by"] == "stream"
    assert resolved["event"]["time"] == T0 + 28 * MIN and resolved["alert"]["value"] == 1.7
    assert [m["alert"]["version"] for m in by_gauge["g1"]] == [1, 2, 3, 4]
    assert [m["event"]["dedup"] for m in by_gauge["g1"]] == [f"{opened['alert']['id']}:{v}" for v in (1, 2, 3, 4)]
    # g2 (0.2 lower) never reaches 3.0 twice in a row: warning only, then resolved
    assert transitions(by_gauge["g2"]) == [("opened", "warning"), ("resolved", "warning")]
    # keyed by alert id
    assert all(k == orjson.loads(v)["alert"]["id"].encode() for t, k, v in w.out.records if t == "alerts")
    assert w.alerts.devices.trackers["river"].state == {}  # calm gauges hold no state


def test_for_as_a_duration_and_below_levels():
    rules = {"rules": [
        {"id": "hot", "kind": "water_level", "metric": "waterLevel", "type": "threshold", "for": "3m",
         "severity": "warning", "above": 5.0},
        {"id": "dry", "kind": "water_level", "metric": "waterLevel", "type": "threshold",
         "levels": [{"severity": "info", "below": 0.5, "clear_above": 0.6},
                    {"severity": "major", "below": 0.2, "clear_above": 0.3}]}]}
    w = Worker(rules)
    for i, lv in enumerate([5.5, 5.6, 5.7, 5.8, 4.0]):
        w.reading("g1", T0 + i * MIN, waterLevel=lv)
    hot = w.alerts_out("hot")
    assert transitions(hot) == [("opened", "warning"), ("resolved", "warning")]
    assert hot[0]["alert"]["opened_at"] == T0 + 3 * MIN  # the condition held for 3 minutes
    for i, lv in enumerate([0.45, 0.55, 0.15, 0.25, 0.35, 0.7]):
        w.reading("g2", T0 + i * MIN, waterLevel=lv)
    assert transitions(w.alerts_out("dry")) == [("opened", "info"), ("escalated", "major"),
                                                ("deescalated", "info"), ("resolved", "info")]


def test_reopen_window_and_flap_suppression():
    rules = {"defaults": {"reopen_window": "10m", "max_reopens": 2, "flap_window": "1h"},
             "rules": [{"id": "r", "kind": "water_level", "metric": "waterLevel", "type": "threshold",
                        "severity": "warning", "above": 2.0, "clear_below": 1.8}]}
    w = Worker(rules)
    t = T0
    for lv in (2.5, 1.5, 2.5):  # re-trigger 1 min after auto-resolve: the same alert re-opens
        w.reading("g1", t, waterLevel=lv)
        t += MIN
    msgs = w.alerts_out()
    assert transitions(msgs) == [("opened", "warning"), ("resolved", "warning"), ("reopened", "warning")]
    assert len({m["alert"]["id"] for m in msgs}) == 1 and msgs[-1]["alert"]["state"] == "open"
    assert msgs[-1]["alert"]["resolved_at"] is None
    first_id = msgs[0]["alert"]["id"]
    for lv in (1.5, 2.5, 1.5, 2.5):  # second and third re-open in the hour: flapping
        w.reading("g1", t, waterLevel=lv)
        t += MIN
    assert [tr for tr, _ in transitions(w.alerts_out())] == [
        "opened", "resolved", "reopened", "resolved", "reopened", "resolved", "reopened"]
    w.out.clear()
    # now flapping: clear readings do not resolve until the level stayed clear for the re-open window
    for _ in range(10):
        w.reading("g1", t, waterLevel=1.5)
        t += MIN
    assert w.alerts_out() == []
    w.reading("g1", t, waterLevel=1.5)
    (res,) = w.alerts_out()
    assert res["event"]["transition"] == "resolved" and "flapping" in res["event"]["note"]
    # long after the re-open window a new trigger is a new alert
    w.out.clear()
    w.reading("g1", t + 30 * MIN, waterLevel=2.5)
    (new,) = w.alerts_out()
    assert new["event"]["transition"] == "opened" and new["alert"]["id"] != first_id
    w.flush(T0 + 10 * 60 * MIN)
    assert not w.alerts.book.closed or all(a["id"] != first_id for a in w.alerts.book.closed.values())


def test_rate_of_rise():
    w = Worker()
    for i, lv in enumerate([1.0, 1.1, 1.2, 1.5, 1.8, 1.7, 1.7, 1.7, 1.75, 1.8, 1.8, 1.8, 1.8, 1.8, 1.8, 1.8]):
        w.reading("g1", T0 + i * 2 * MIN, waterLevel=lv)
    msgs = w.alerts_out("rising")
    # +0.5 within 10 minutes at 1.5 (1.0 -> 1.5 is not > 0.5; 1.0 -> 1.8 at t=8m is); clears when the
    # change over the last 10 minutes is back under 0.2
    assert transitions(msgs) == [("opened", "major"), ("resolved", "major")]
    assert msgs[0]["alert"]["opened_at"] == T0 + 8 * MIN
    assert msgs[0]["alert"]["value"] == pytest.approx(0.8)


def test_absence_in_event_time_and_on_a_silent_partition():
    w = Worker()
    w.reading("g1", T0, waterLevel=1.0)
    w.reading("g2", T0, waterLevel=1.0)
    w.flush(T0 + 1000)
    for i in range(1, 13):  # g2 keeps talking, g1 is silent
        w.reading("g2", T0 + i * MIN, waterLevel=1.0)
        w.flush(T0 + i * MIN + 1000)
    msgs = w.alerts_out("silent")
    assert transitions(msgs) == [("opened", "major")]
    assert msgs[0]["alert"]["entity"] == "g1" and msgs[0]["alert"]["opened_at"] == T0 + 10 * MIN
    assert msgs[0]["alert"]["kind"] == "water_level" and msgs[0]["alert"]["kecamatan"] == "35.09.19"
    # the same check again does not duplicate it
    w.flush(T0 + 13 * MIN)
    assert len(w.alerts_out("silent")) == 1
    w.reading("g1", T0 + 13 * MIN, waterLevel=1.0)  # back: resolved
    assert transitions(w.alerts_out("silent")) == [("opened", "major"), ("resolved", "major")]
    # now every gauge goes silent: the partition's watermark stops, the wall clock carries the timers on
    w.out.clear()
    last = T0 + 13 * MIN
    w.flush(last + 1000)
    w.flush(last + 5 * MIN)
    assert w.alerts_out("silent") == []
    w.flush(last + 11 * MIN)
    assert sorted(m["alert"]["entity"] for m in w.alerts_out("silent")) == ["g1", "g2"]


def test_sla_timer_fires_once_and_resolves_at_the_end_status():
    w = Worker()
    H = 3_600_000

    def ev(entity: str, status: str, t: int, region: str = "35.09.19.1001") -> None:
        w.alerts.on_service_event(SimpleNamespace(type="jember.complaint.v1", entity_id=entity, status=status,
                                                  time_ms=t, region=region, kecamatan=region[:8], id=f"{entity}/{status}"),
                                  w.out)

    ev("C1", "opened", T0)
    ev("C2", "opened", T0 + H)
    ev("C2", "assigned", T0 + 2 * H)
    ev("C3", "resolved", T0 + 3 * H)  # the end before its start (out of order): never pending
    ev("C3", "opened", T0 + H)
    w.flush(T0 + 3 * H)
    assert w.alerts_out() == []
    ev("C2", "resolved", T0 + 70 * H)  # within 72h
    ev("X", "assigned", T0 + 72 * H + 1000)  # moves the service clock past C1's deadline
    w.flush(T0 + 3 * H + 1000)
    msgs = w.alerts_out("complaint-sla")
    assert transitions(msgs) == [("opened", "warning")]
    a = msgs[0]["alert"]
    assert a["entity"] == "C1" and a["opened_at"] == T0 + 72 * H and a["kind"] == "jember.complaint.v1"
    assert a["kecamatan"] == "35.09.19"
    w.flush(T0 + 4 * H)
    assert len(w.alerts_out("complaint-sla")) == 1  # no duplicate from later checks
    ev("C1", "resolved", T0 + 80 * H)
    assert transitions(w.alerts_out("complaint-sla")) == [("opened", "warning"), ("resolved", "warning")]


def test_operator_commands_ack_keeps_escalations_and_resolve_starts_a_new_alert():
    w = Worker()
    for i, lv in enumerate([2.5, 2.5]):
        w.reading("g1", T0 + i * MIN, waterLevel=lv)
    (opened,) = w.alerts_out("river")
    alert = opened["alert"]
    w.command("ack", alert, actor="budi", command_id="k1")
    w.command("ack", alert, actor="budi", command_id="k1")  # the same command replayed: nothing new
    for i, lv in enumerate([3.5, 3.6]):
        w.reading("g1", T0 + (2 + i) * MIN, waterLevel=lv)
    msgs = w.alerts_out("river")
    assert transitions(msgs) == [("opened", "warning"), ("acknowledged", "warning"), ("escalated", "critical")]
    ack, esc = msgs[1], msgs[2]
    assert ack["event"]["dedup"] == command_dedup(alert["id"], "k1") and ack["event"]["actor"] == "budi"
    assert ack["alert"]["acknowledged_by"] == "budi" and ack["alert"]["state"] == "acknowledged"
    assert esc["alert"]["state"] == "acknowledged" and esc["alert"]["version"] == 3  # acknowledged, still emitted
    w.command("resolve", alert, actor="sari", command_id="k2")
    res = w.alerts_out("river")[-1]
    assert res["event"]["transition"] == "resolved" and res["alert"]["resolved_by"] == "sari"
    assert res["event"]["dedup"] == command_dedup(alert["id"], "k2")
    w.out.clear()
    w.reading("g1", T0 + 5 * MIN, waterLevel=3.7)  # still high: a NEW alert
    (new,) = w.alerts_out("river")
    assert new["event"]["transition"] == "opened" and new["alert"]["id"] != alert["id"]
    assert new["alert"]["severity"] == "critical"
    # a malformed command is dead-lettered with its reason
    w.out.clear()
    w.feed(orjson.dumps({"type": COMMAND_TYPE, "id": "x", "data": {"action": "delete"}}))
    (dl,) = [orjson.loads(v) for t, _, v in w.out.records if t == "dlq"]
    assert dl["reason"] == reasons.INVALID_PAYLOAD


def test_restore_after_a_crash_continues_the_same_alerts_without_duplicates():
    w = Worker()
    for i, lv in enumerate([2.5, 2.6]):
        w.reading("g1", T0 + i * MIN, waterLevel=lv)
    w.reading("g2", T0, waterLevel=1.0)
    w.reading("g2", T0 + MIN, waterLevel=3.5)  # one reading into a 2-reading `for`
    w.alerts.on_service_event(SimpleNamespace(type="jember.complaint.v1", entity_id="C1", status="opened",
                                              time_ms=T0, region="35.09.19", kecamatan="35.09.19", id="e1"), w.out)
    w.flush(T0 + 2 * MIN)
    (opened,) = w.alerts_out("river")
    snap = orjson.loads(orjson.dumps(w.part.snapshot(True)))  # JSON, as on the state topic

    w2 = Worker()
    w2.part.restore(snap)
    assert w2.alerts.book.open.keys() == w.alerts.book.open.keys()
    assert w2.alerts.book.open[("river", "g1")] == w.alerts.book.open[("river", "g1")]
    for i, lv in enumerate([2.7, 3.5, 3.6]):  # replayed/continued input
        w2.reading("g1", T0 + (2 + i) * MIN, waterLevel=lv)
    w2.reading("g2", T0 + 2 * MIN, waterLevel=3.5)  # completes the streak begun before the crash
    msgs = w2.alerts_out("river")
    assert transitions([m for m in msgs if m["alert"]["entity"] == "g1"]) == [("escalated", "critical")]
    g1 = [m for m in msgs if m["alert"]["entity"] == "g1"][0]
    assert g1["alert"]["id"] == opened["alert"]["id"] and g1["alert"]["version"] == 2
    assert transitions([m for m in msgs if m["alert"]["entity"] == "g2"]) == [("opened", "critical")]
    # timers survive too: the absence of g1/g2 (the wall clock counts from the first checkpoint after the
    # restore, on top of the restored watermark T0+4m) and the complaint's SLA
    w2.flush(T0 + 30 * MIN)
    assert w2.alerts_out("silent") == []
    w2.flush(T0 + 41 * MIN)
    assert {m["alert"]["entity"] for m in w2.alerts_out("silent")} == {"g1", "g2"}
    w2.alerts.on_service_event(SimpleNamespace(type="jember.complaint.v1", entity_id="C9", status="assigned",
                                               time_ms=T0 + 73 * 3_600_000, region="35.09.19", kecamatan="35.09.19",
                                               id="e2"), w2.out)
    w2.flush(T0 + 42 * MIN)
    assert [m["alert"]["entity"] for m in w2.alerts_out("complaint-sla")] == ["C1"]


def test_readings_without_rules_cost_no_state():
    w = Worker({"rules": []})
    assert not w.alerts.devices.active
    w.reading("g1", T0, waterLevel=9.0)
    assert w.alerts_out() == [] and w.alerts.snapshot(True)["dev"] == {"t": {}, "a": {}}
    w2 = Worker()
    w2.reading("bin", T0, fillingLevel=0.5)  # no rule for this kind: one empty plan, nothing else
    assert w2.alerts.devices.plans["bin"].metrics == {} and not w2.alerts.devices.plans["bin"].absence


def partial(kec: str, start: int, values: list[float], src: str = "jember.ingest:0") -> bytes:
    return orjson.dumps({"kecamatan": kec, "metric": "pm25", "window_start": start, "window_end": start + MIN,
                         "src": src, "state": [float(len(values)), min(values), max(values), sum(values),
                                               values[-1], float(start + 30_000)], "watermark": start + 30_000,
                         "final": False})


def test_aggregate_hourly_mean_per_kecamatan_in_the_merge_stage_with_commands_and_restore():
    ruleset = parse_rules(RULES)

    def merge() -> RegionMergePartition:
        m = RegionMergePartition(0, "jember.internal.region-partials", MIN, 3_600_000)
        m.alerts = RegionAlerts(ruleset, MIN)
        return m

    m, out = merge(), Outputs()
    off = 0

    def feed(raw: bytes, mm: RegionMergePartition = m, o: Outputs = out) -> None:
        nonlocal off
        mm.process(raw, off, T0, o)
        mm.offset = off
        off += 1

    # 35.09.19: 30 quiet minutes, then 30 smoky ones (two source partitions per window)
    for i in range(60):
        v = 20.0 if i < 30 else 110.0
        feed(partial("35.09.19", T0 + i * MIN, [v], "jember.ingest:0"))
        feed(partial("35.09.19", T0 + i * MIN, [v + 10], "jember.ingest:1"))
        feed(partial("35.09.20", T0 + i * MIN, [10.0]))
        m.flush(out)
    msgs = [orjson.loads(v) for t, _, v in out.records if t == "alerts"]
    assert transitions(msgs) == [("opened", "warning")]
    a = msgs[0]["alert"]
    assert a["entity"] == "35.09.19" and a["kecamatan"] == "35.09.19" and a["metric"] == "pm25"
    assert a["value"] > 55.4
    # an operator's ack reaches the merge partition (forwarded by the ingest stage)
    w = Worker()
    w.command("ack", a, command_id="k9")
    fwd = [(t, k, v) for t, k, v in w.out.records if t == "internal.region-partials"]
    assert fwd and fwd[0][1] == b"35.09.19"
    feed(fwd[0][2])
    ack = orjson.loads(out.records[-1][2])
    assert ack["event"]["transition"] == "acknowledged" and ack["alert"]["state"] == "acknowledged"
    # restore into a new merge partition, continue with clean air: resolved, same alert
    m.flush(out)
    snap = orjson.loads(orjson.dumps(m.snapshot(True)))
    m2, out2 = merge(), Outputs()
    m2.restore(snap)
    for i in range(60, 120):
        feed(partial("35.09.19", T0 + i * MIN, [10.0]), m2, out2)
        m2.flush(out2)
    msgs2 = [orjson.loads(v) for t, _, v in out2.records if t == "alerts"]
    assert transitions(msgs2) == [("resolved", "warning")] and msgs2[0]["alert"]["id"] == a["id"]
    assert msgs2[0]["alert"]["acknowledged_by"] == "budi"


def test_escalation_needs_consecutive_readings_even_while_the_level_holds():
    w = Worker()
    # warning after 2.5, 2.5; then critical readings interleaved with warning ones never escalate (for: 2)
    for i, lv in enumerate([2.5, 2.5, 3.5, 2.5, 3.5, 2.4, 3.6, 2.9, 3.7]):
        w.reading("g1", T0 + i * MIN, waterLevel=lv)
    assert transitions(w.alerts_out("river")) == [("opened", "warning")]
    w.reading("g1", T0 + 9 * MIN, waterLevel=3.8)  # 3.7, 3.8: two in a row
    assert transitions(w.alerts_out("river"))[-1] == ("escalated", "critical")


@pytest.mark.parametrize("seed", range(12))
def test_delta_checkpoints_restore_to_the_same_state_and_the_same_future(seed):
    """Checkpoints as the runtime takes them (a full one, then deltas, a full one now and then); a new
    partition restored from the full one and the deltas after it continues exactly like the original."""
    import random

    rng = random.Random(seed)
    w = Worker()
    levels = {"g1": 1.0, "g2": 1.0}
    snaps: list[dict] = []
    t = T0
    steps: list[tuple] = []
    for i in range(400):
        t += rng.choice([10_000, 30_000, 60_000])
        r = rng.random()
        if r < 0.6:
            g = rng.choice(["g1", "g1", "g2"])  # g2 is often silent long enough for its absence alert
            levels[g] = min(6.0, max(0.0, levels[g] + rng.uniform(-0.6, 0.7)))
            steps.append(("reading", g, t, round(levels[g], 2)))
        elif r < 0.75:
            steps.append(("service", f"C{rng.randrange(8)}", rng.choice(["opened", "resolved", "assigned"]), t))
        elif r < 0.85:
            steps.append(("command", rng.choice(["ack", "resolve"]), f"k{i}"))
        else:
            steps.append(("checkpoint", t))
    cut = rng.randrange(len(steps) // 3, 2 * len(steps) // 3)
    while steps[cut][0] != "checkpoint":
        cut += 1

    def run(worker: Worker, todo: list[tuple], record: list | None) -> None:
        for step in todo:
            if step[0] == "reading":
                worker.reading(step[1], step[2], waterLevel=step[3])
            elif step[0] == "service":
                worker.alerts.on_service_event(SimpleNamespace(
                    type="jember.complaint.v1", entity_id=step[1], status=step[2], time_ms=step[3],
                    region="35.09.19", kecamatan="35.09.19", id=f"{step[1]}/{step[3]}"), worker.out)
            elif step[0] == "command":
                if worker.alerts.book.open:
                    a = sorted(worker.alerts.book.open.values(), key=lambda x: x["id"])[0]
                    worker.command(step[1], a, command_id=step[2])
            else:
                # both clocks advance before each checkpoint, so the wall-clock part is the same for both runs
                worker.reading("g1", step[1] + 1, waterLevel=levels["g1"])
                worker.alerts.on_service_event(SimpleNamespace(
                    type="jember.complaint.v1", entity_id="Z", status="assigned", time_ms=step[1] + 1,
                    region="35.09.19", kecamatan="35.09.19", id=f"Z/{step[1]}"), worker.out)
                worker.flush(step[1] + 2)
                if record is not None:
                    record.append(orjson.loads(orjson.dumps(worker.part.snapshot(len(record) % 5 == 0))))

    run(w, steps[:cut + 1], snaps)
    last_full = max(i for i, s in enumerate(snaps) if s["full"])
    w2 = Worker()
    for s in snaps[last_full:]:
        w2.part.restore(s)
    assert w2.alerts.book.open == w.alerts.book.open and w2.alerts.book.closed == w.alerts.book.closed
    for part in ("dev", "sla", "clk"):  # (the book's lists may differ in order only; compared as dicts above)
        assert orjson.loads(orjson.dumps(w2.alerts.snapshot(True)[part])) == orjson.loads(
            orjson.dumps(w.alerts.snapshot(True)[part]))
    w.out.clear()
    w2.wall = w.wall  # the commands' time
    run(w, steps[cut + 1:], None)
    run(w2, steps[cut + 1:], None)
    assert w2.alerts_out() == w.alerts_out()


def test_rate_rule_with_for_needs_the_rise_on_consecutive_readings():
    rules = {"rules": [{"id": "rise2", "kind": "water_level", "metric": "waterLevel", "type": "rate", "over": "10m",
                        "severity": "warning", "above": 0.5, "clear_below": 0.2, "for": 2}]}
    w = Worker(rules)
    for i, lv in enumerate([1.0, 1.7, 1.0, 1.1, 1.0, 1.6, 1.7]):  # a single spike, then a sustained rise
        w.reading("g1", T0 + i * MIN, waterLevel=lv)
    msgs = w.alerts_out("rise2")
    assert transitions(msgs) == [("opened", "warning")] and msgs[0]["alert"]["opened_at"] == T0 + 6 * MIN
