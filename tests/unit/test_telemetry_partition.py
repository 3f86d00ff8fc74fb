"""The hot path without Kafka: windows, duplicates, lateness, and state that survives a crash."""

import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import reasons
from schemas.envelope import TELEMETRY_TYPE
from stream_processors.outputs import Outputs
from stream_processors.region_merge import RegionMergePartition
from stream_processors.telemetry import TelemetryPartition
from stream_processors.validation import TimePolicy
from tests.helpers import Dev

T0 = 1_790_000_040_000  # a window boundary (divisible by 60 000)
NOW = T0 + 3_600_000
POLICY = TimePolicy(max_age_ms=10**12, max_future_ms=10**12)


REG = {f"d{i}": Dev(f"d{i}", "water_level", f"35.09.{(i % 3) + 1:02d}.2001") for i in range(6)}


def raw(device, t, value, seq=None):
    return orjson.dumps({"specversion": "1.0", "id": f"{device}/{t}" + (f"/{seq}" if seq else ""),
                         "source": f"/jember/v1/{device}", "type": TELEMETRY_TYPE, "time": t,
                         "subject": device, "data": {"values": {"waterLevel": value}}})


def new_partition(lateness_ms=120_000):
    return TelemetryPartition(0, "jember.ingest", 60_000, lateness_ms, POLICY, lambda: REG)


def records(out, topic):
    return [orjson.loads(v) for t, _, v in out.records if t == topic]


def test_readings_aggregates_and_region_partials():
    p, out = new_partition(), Outputs()
    for i, (dev, dt, v) in enumerate([("d0", 0, 1.0), ("d0", 10_000, 3.0), ("d3", 5_000, 2.0), ("d1", 1, 7.0)]):
        p.process(raw(dev, T0 + dt, v), i, NOW, out)
        p.offset = i
    assert len(records(out, "telemetry")) == 4
    p.flush(out)
    aggs = {(a["key"], a["window_start"]): a for a in records(out, "aggregates")}
    assert aggs[("d0", T0)]["count"] == 2 and aggs[("d0", T0)]["mean"] == 2.0 and aggs[("d0", T0)]["last"] == 3.0
    partials = {p_["kecamatan"]: p_ for p_ in records(out, "internal.region-partials")}
    # d0 and d3 are both in 35.09.01
    assert partials["35.09.01"]["state"][0] == 3.0 and partials["35.09.02"]["state"][0] == 1.0


def test_duplicate_and_late_readings_are_dead_lettered_with_reasons():
    p, out = new_partition(lateness_ms=60_000), Outputs()
    p.process(raw("d0", T0, 1.0), 0, NOW, out)
    p.process(raw("d0", T0, 1.0), 1, NOW, out)  # same reading again
    p.process(raw("d0", T0 + 200_000, 1.0), 2, NOW, out)  # moves the watermark
    p.process(raw("d0", T0 + 5_000, 9.0), 3, NOW, out)  # window T0 closed: end + lateness <= watermark
    dlq = records(out, "dlq")
    assert [d["reason"] for d in dlq] == [reasons.DUPLICATE, reasons.TOO_LATE]
    assert all(d["offset"] in (1, 3) and d["raw"] for d in dlq)


def test_reading_older_than_the_lateness_is_stored_flagged_late_and_answered():
    p, out = new_partition(lateness_ms=60_000), Outputs()
    p.process(raw("d0", T0 + 1000, 1.0), 0, NOW, out)
    p.process(raw("d1", T0 + 1_800_000, 2.0), 1, NOW, out)  # another device moves the partition's watermark
    p.flush(out)
    out.clear()
    # d0 comes back after a 30-minute outage with its buffered readings (one JSON array at the gateway)
    for i, dt in enumerate((2000, 62_000, 1_790_000)):
        p.process(raw("d0", T0 + dt, 3.0 + i), 2 + i, NOW, out)
    tel = records(out, "telemetry")
    assert [(m["time"] - T0, m.get("late", False)) for m in tel] == [(2000, True), (62_000, True), (1_790_000, False)]
    assert [d["reason"] for d in records(out, "dlq")] == [reasons.TOO_LATE, reasons.TOO_LATE]
    assert all("stored" in d["message"] and d["device_id"] == "d0" for d in records(out, "dlq"))
    p.flush(out)
    # the closed window's aggregate was not touched; the open one got the in-window reading
    starts = {a["window_start"] - T0 for a in records(out, "aggregates") if a["key"] == "d0"}
    assert starts == {1_740_000}


def test_late_reading_within_lateness_corrects_its_window():
    p, out = new_partition(), Outputs()
    p.process(raw("d0", T0 + 1000, 1.0), 0, NOW, out)
    p.process(raw("d0", T0 + 61_000, 5.0), 1, NOW, out)
    p.flush(out)
    out.clear()
    p.process(raw("d0", T0 + 2000, 3.0), 2, NOW, out)  # late, but inside the lateness
    p.flush(out)
    agg = [a for a in records(out, "aggregates") if a["window_start"] == T0]
    assert len(agg) == 1 and agg[0]["count"] == 2 and agg[0]["max"] == 3.0 and agg[0]["last"] == 3.0


def test_unparseable_bytes_go_to_dlq():
    p, out = new_partition(), Outputs()
    p.process(b"\xff\xfe not json", 7, NOW, out)
    (dl,) = records(out, "dlq")
    assert dl["reason"] == reasons.MALFORMED_JSON and dl["raw_encoding"] == "base64" and dl["offset"] == 7


def final_view(outs):
    """What the database would hold: readings by (device, metric, time), last aggregate per key."""
    readings, aggs = {}, {}
    for out in outs:
        for t, _, v in out.records:
            m = orjson.loads(v)
            if t == "telemetry":
                for metric, value in m["values"].items():
                    readings.setdefault((m["device_id"], metric, m["time"]), value)
            elif t == "aggregates":
                aggs[(m["key"], m["metric"], m["window_start"])] = (m["count"], m["min"], m["max"], round(m["sum"], 6))
    return readings, aggs


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 199), st.integers(0, 199))
def test_crash_and_restore_gives_the_same_result_as_no_crash(seed, crash_at, commit_lag):
    rng = random.Random(seed)
    stream = []
    t = T0
    for i in range(200):
        t += rng.randint(0, 4000)
        dev = f"d{rng.randint(0, 5)}"
        dt = t - rng.choice([0, 0, 0, 30_000, 300_000])  # some late, some beyond the lateness
        stream.append(raw(dev, dt, round(rng.uniform(0, 5), 2)) if rng.random() > 0.1 else stream[rng.randint(0, max(0, i - 1))] if stream else raw(dev, dt, 1.0))

    def run(p, out, start, end, checkpoints):
        for off in range(start, end):
            if off <= p.offset:
                continue
            p.process(stream[off], off, NOW, out)
            p.offset = off
            if off % 25 == 24:
                p.flush(out)
                checkpoints.append(p.snapshot(full=len(checkpoints) % 3 == 0))

    # uninterrupted
    ref_out = Outputs()
    ref = new_partition()
    run(ref, ref_out, 0, len(stream), [])
    ref.flush(ref_out)

    # crash after `crash_at`: outputs up to there were produced, state only as of the last checkpoint
    out1, cps = Outputs(), []
    p1 = new_partition()
    run(p1, out1, 0, crash_at, cps)
    restored = new_partition()
    full_seen = False
    for cp in cps:
        full_seen = full_seen or cp["full"]
        if full_seen:
            restored.restore(cp)
    restored.drop_closed()
    committed = max(0, (cps[-1]["offset"] + 1 if cps else 0) - commit_lag)  # offsets commit at or before state
    out2 = Outputs()
    run(restored, out2, committed, len(stream), [])
    restored.flush(out2)
    assert final_view([out1, out2]) == final_view([ref_out])


def test_region_merge_combines_sources_and_is_idempotent():
    m, out = RegionMergePartition(0, "jember.internal.region-partials", 60_000, 3_600_000), Outputs()

    def partial(src, count, lo, hi, total, last, last_time):
        return orjson.dumps({"kecamatan": "35.09.01", "metric": "waterLevel", "window_start": T0,
                             "src": src, "state": [count, lo, hi, total, last, last_time], "watermark": T0})

    m.process(partial("a", 2, 1.0, 2.0, 3.0, 2.0, T0 + 5), 0, NOW, out)
    m.process(partial("b", 1, 0.5, 0.5, 0.5, 0.5, T0 + 9), 1, NOW, out)
    m.process(partial("a", 2, 1.0, 2.0, 3.0, 2.0, T0 + 5), 2, NOW, out)  # replayed: replaces, no double count
    m.flush(out)
    (agg,) = records(out, "aggregates")
    assert agg["scope"] == "kecamatan" and agg["count"] == 3 and agg["min"] == 0.5 and agg["last"] == 0.5
    snap = m.snapshot(full=True)
    m2 = RegionMergePartition(0, "x", 60_000, 3_600_000)
    m2.restore(orjson.loads(orjson.dumps(snap)))
    assert m2.state == m.state


def _partial(src: str, start: int, watermark: int, count: float = 1.0, closed: int = -1) -> bytes:
    return orjson.dumps({"kecamatan": "35.09.01", "metric": "waterLevel", "window_start": start, "src": src,
                         "state": [count, 1.0, 1.0, count, 1.0, start + 1], "watermark": watermark,
                         "closed": closed})


def test_region_merge_keeps_a_window_until_every_source_checkpointed_past_it_then_refuses_it():
    size, lateness, retention = 60_000, 600_000, 4_200_000
    m = RegionMergePartition(0, "p", size, retention, lateness_ms=lateness, expected_sources=2)
    out = Outputs()
    closed = T0 + size + lateness  # the watermark at which a source closes the window
    m.process(_partial("a", T0, T0 + 10), 0, NOW, out)
    m.process(_partial("a", T0 + 20 * size, closed + 5_000, closed=closed), 1, NOW, out)  # a checkpointed past it
    m.flush(out)
    assert ("35.09.01", "waterLevel", T0) in m.state, "b was never heard of: it may still send a partial"
    m.process(_partial("b", T0, T0 + 20), 2, NOW, out)
    m.process(_partial("b", T0 + 20 * size, closed + 1_000, closed=T0 + 30), 3, NOW, out)
    m.flush(out)
    assert ("35.09.01", "waterLevel", T0) in m.state, "b has not checkpointed past it"
    m.process(_partial("b", T0, closed, count=3.0, closed=T0 + 30), 4, NOW, out)  # b's final partial of it
    m.process(_partial("b", T0 + 20 * size, closed + 2_000), 5, NOW, out)  # a restarted b: no proof yet
    m.flush(out)
    merged = [r for r in records(out, "aggregates") if r["window_start"] == T0]
    assert merged[-1]["count"] == 4 and ("35.09.01", "waterLevel", T0) in m.state
    m.process(_partial("b", T0 + 21 * size, closed + 60_000, closed=closed), 6, NOW, out)  # b's checkpoint
    m.flush(out)
    assert ("35.09.01", "waterLevel", T0) not in m.state
    assert len(m.state) == 2  # only the open windows are held: memory does not grow with the retention
    before = len(records(out, "aggregates"))
    m.process(_partial("b", T0, T0 + 40), 7, NOW, out)  # a replayed partial of a dropped window
    m.flush(out)
    assert m.expired == 1 and ("35.09.01", "waterLevel", T0) not in m.state
    assert all(r["window_start"] != T0 for r in records(out, "aggregates")[before:]), \
        "a merge of part of the sources must not overwrite the complete aggregate"
    snap = orjson.loads(orjson.dumps(m.snapshot(full=False)))
    m2 = RegionMergePartition(0, "p", size, retention, lateness_ms=lateness, expected_sources=2)
    m2.restore(snap)
    assert m2.source_closed == m.source_closed and m2.closed_below == m.closed_below


def test_region_merge_learns_the_number_of_sources_from_the_partials():
    size, lateness, retention = 60_000, 600_000, 4_200_000
    m, out = RegionMergePartition(0, "p", size, retention, lateness_ms=lateness), Outputs()  # 1 configured
    far = T0 + 30 * size + lateness
    m.process(orjson.dumps({**orjson.loads(_partial("a", T0, far, closed=far)), "of": 2}), 0, NOW, out)
    m.flush(out)
    assert ("35.09.01", "waterLevel", T0) in m.state, "the second ingest partition was not heard of yet"


def test_a_source_partial_carries_the_watermark_of_its_last_written_checkpoint():
    p, out = new_partition(), Outputs()
    p.source_partitions = 4
    p.process(raw("d0", T0, 1.0), 0, NOW, out)
    p.offset = 0
    p.flush(out)
    snap = p.snapshot(full=True)
    p.process(raw("d0", T0 + 5_000, 2.0), 1, NOW, out)
    p.offset = 1
    p.flush(out)  # the snapshot was not written (yet): no proof
    assert [r["closed"] for r in records(out, "internal.region-partials")] == [-1, -1]
    p.checkpoint_written()
    p.process(raw("d0", T0 + 6_000, 2.0), 2, NOW, out)
    p.flush(out)
    last = records(out, "internal.region-partials")[-1]
    assert last["closed"] == T0 and last["of"] == 4  # the snapshot's watermark, not the newest
    restored = new_partition()
    restored.restore(orjson.loads(orjson.dumps(snap)))
    assert restored.checkpointed_watermark == T0  # a restart resumes from a written checkpoint


def test_region_merge_bounds_a_silent_source_by_the_retention():
    size, lateness, retention = 60_000, 600_000, 4_200_000
    m = RegionMergePartition(0, "p", size, retention, lateness_ms=lateness, expected_sources=2)
    out = Outputs()
    m.process(_partial("a", T0, T0 + 10), 0, NOW, out)
    m.process(_partial("b", T0, T0 + 10), 1, NOW, out)  # b then falls silent
    m.process(_partial("a", T0 + 30 * size, T0 + 30 * size, closed=T0 + 30 * size), 2, NOW, out)
    m.flush(out)
    assert ("35.09.01", "waterLevel", T0) in m.state  # b holds it
    m.process(_partial("a", T0 + 90 * size, T0 + size + retention), 3, NOW, out)
    m.flush(out)
    assert ("35.09.01", "waterLevel", T0) not in m.state  # but not past the retention


def test_status_of_a_registered_device_is_forwarded_and_unknown_is_dead_lettered():
    from schemas.envelope import STATUS_TYPE
    from stream_processors.device_status import DeviceStatusHandler

    p, out = new_partition(), Outputs()
    p.handlers[STATUS_TYPE] = DeviceStatusHandler(0, "jember.ingest", lambda: REG)

    def status(device, value):
        return orjson.dumps({"specversion": "1.0", "id": f"{device}/status/1", "source": "x", "type": STATUS_TYPE,
                             "time": T0, "subject": device, "data": {"status": value}})

    p.process(status("d1", "offline"), 0, NOW, out)
    p.process(status("nobody", "online"), 1, NOW, out)
    p.process(status("d1", "asleep"), 2, NOW, out)
    assert records(out, "device-status") == [{"device_id": "d1", "status": "offline", "reason": "status_message",
                                              "time": T0, "last_seen": None, "id": "d1/status/1"}]
    assert [d["reason"] for d in records(out, "dlq")] == [reasons.UNKNOWN_DEVICE, reasons.INVALID_PAYLOAD]


def test_running_window_states_go_out_at_most_every_interval_and_always_when_they_close():
    p, out = new_partition(lateness_ms=60_000), Outputs()
    p.aggregate_interval_ms = 5_000
    clock = 1_000_000
    p.process(raw("d0", T0, 1.0), 0, NOW, out)
    p.flush(out, clock)  # first emission: at once
    assert [a["count"] for a in records(out, "aggregates")] == [1]
    out.clear()
    p.process(raw("d0", T0 + 10_000, 3.0), 1, NOW, out)
    p.flush(out, clock + 1_000)  # changed, but within the interval: held (still in the state)
    assert records(out, "aggregates") == []
    p.snapshot(False)
    p.process(raw("d0", T0 + 20_000, 5.0), 2, NOW, out)
    p.flush(out, clock + 5_000)  # the interval passed: the newest full state, once
    assert [(a["count"], a["sum"], a["final"]) for a in records(out, "aggregates")] == [(3, 9.0, False)]
    out.clear()
    p.process(raw("d0", T0 + 30_000, 1.0), 3, NOW, out)
    p.process(raw("d1", T0 + 200_000, 1.0), 4, NOW, out)  # the watermark closes window T0
    p.flush(out, clock + 6_000)
    finals = [(a["key"], a["count"], a["final"]) for a in records(out, "aggregates") if a["key"] == "d0"]
    assert finals == [("d0", 4, True)], "a held-back change goes out with the window's final state"


def test_a_held_back_window_state_goes_out_after_a_restore():
    p, out = new_partition(), Outputs()
    p.aggregate_interval_ms = 5_000
    p.process(raw("d0", T0, 1.0), 0, NOW, out)
    p.offset = 0
    p.flush(out, 1_000_000)
    p.process(raw("d0", T0 + 10_000, 3.0), 1, NOW, out)
    p.offset = 1
    p.flush(out, 1_001_000)  # held back
    checkpoint = orjson.loads(orjson.dumps(p.snapshot(True)))
    # the worker dies here; the next owner restores and must emit the held-back state
    q, out2 = new_partition(), Outputs()
    q.aggregate_interval_ms = 5_000
    q.restore(checkpoint)
    q.flush(out2, 1_001_500)
    assert [(a["count"], a["sum"]) for a in records(out2, "aggregates")] == [(2, 4.0)]


def test_a_device_registered_after_the_last_registry_snapshot_is_looked_up_again():
    """The registry refreshes on a miss at most every 0.25 s; a reading received after the snapshot was
    taken gets one more lookup (refresh_if_older_than) before it is refused as unknown."""
    registry: dict[str, Dev] = dict(REG)
    snapshot_ms = [NOW - 100]
    asked: list[int] = []

    def refresh_if_older_than(received_ms: int) -> bool:
        asked.append(received_ms)
        if snapshot_ms[0] >= received_ms:
            return False
        registry["late-added"] = Dev("late-added", "water_level", "35.09.01.2001")  # what the database now holds
        snapshot_ms[0] = received_ms + 1
        return True

    p, out = TelemetryPartition(0, "jember.ingest", 60_000, 120_000, POLICY, lambda: registry), Outputs()
    p.refresh_registry = refresh_if_older_than

    def env(device, received):
        e = orjson.loads(raw(device, T0, 1.0))
        e["arusreceived"] = received
        return orjson.dumps(e)

    p.process(env("never-added", NOW - 200), 0, NOW, out)  # received before the snapshot: unknown at once
    p.process(env("late-added", NOW), 1, NOW, out)  # received after it: looked up again, accepted
    assert asked == [NOW - 200, NOW]
    assert [r["device_id"] for r in records(out, "telemetry")] == ["late-added"]
    assert [d["reason"] for d in records(out, "dlq")] == [reasons.UNKNOWN_DEVICE]
