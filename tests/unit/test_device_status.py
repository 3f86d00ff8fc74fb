"""Device status in the stream: transitions from status messages, readings and silence; checkpoints."""


import orjson

from schemas.envelope import STATUS_TYPE, TELEMETRY_TYPE
from stream_processors.device_status import DeviceStatusHandler
from stream_processors.outputs import Outputs
from stream_processors.telemetry import TelemetryPartition
from stream_processors.validation import TimePolicy
from tests.helpers import Dev

T0 = 1_790_000_040_000
POLICY = TimePolicy(max_age_ms=10**12, max_future_ms=10**12)
TOL = 3 * 120_000  # water_level: expected every 120 s, factor 3


REG = {"wl": Dev("wl", "water_level", "35.09.19.1001"), "bin": Dev("bin", "waste_container", "35.09.19.1001")}


def new_partition():
    p = TelemetryPartition(0, "jember.ingest", 60_000, 600_000, POLICY, lambda: REG)
    h = DeviceStatusHandler(0, "jember.ingest", lambda: REG, silence_factor=3.0)
    p.handlers[STATUS_TYPE] = h
    p.observers.append(h)
    return p, h


def reading(device, t, received, value=1.0, metric="waterLevel"):
    return orjson.dumps({"specversion": "1.0", "id": f"{device}/{t}", "source": f"/jember/v1/{device}",
                         "type": TELEMETRY_TYPE, "time": t, "subject": device, "arusreceived": received,
                         "data": {"values": {metric: value}}})


def status(device, value, t):
    return orjson.dumps({"specversion": "1.0", "id": f"{device}/status/{t}", "source": "x", "type": STATUS_TYPE,
                         "time": t, "subject": device, "data": {"status": value}})


def transitions(out):
    return [(m["device_id"], m["status"], m["reason"]) for m in
            (orjson.loads(v) for t, _, v in out.records if t == "device-status")]


def test_reading_makes_online_once_and_silence_makes_offline_after_the_tolerance():
    p, h = new_partition()
    out = Outputs()
    p.flush(out, now_ms=T0)  # the worker starts
    p.process(reading("wl", T0, T0 + 50), 0, T0 + 60, out)
    p.process(reading("wl", T0 + 60_000, T0 + 60_050), 1, T0 + 60_060, out)
    assert transitions(out) == [("wl", "online", "reading")]
    (msg,) = [orjson.loads(v) for t, _, v in out.records if t == "device-status"]
    assert msg["time"] == T0 + 50 and msg["last_seen"] == T0
    out.clear()
    p.flush(out, now_ms=T0 + 60_050 + TOL)  # exactly at the tolerance: still online
    assert transitions(out) == []
    p.flush(out, now_ms=T0 + 60_051 + TOL)
    assert transitions(out) == [("wl", "offline", "silent")]
    (msg,) = [orjson.loads(v) for t, _, v in out.records if t == "device-status"]
    assert msg["last_seen"] == T0 + 60_000 and msg["time"] == T0 + 60_051 + TOL
    out.clear()
    p.flush(out, now_ms=T0 + 10 * TOL)  # transitions only: no repeat
    assert transitions(out) == []
    p.process(reading("wl", T0 + 10 * TOL, T0 + 10 * TOL), 2, T0 + 10 * TOL, out)
    assert transitions(out) == [("wl", "online", "reading")]


def test_tolerance_follows_the_kind():
    p, h = new_partition()
    out = Outputs()
    p.flush(out, now_ms=T0)
    p.process(reading("wl", T0, T0), 0, T0, out)
    p.process(reading("bin", T0, T0, 0.5, "fillingLevel"), 1, T0, out)
    out.clear()
    p.flush(out, now_ms=T0 + TOL + 1)  # a gauge reports every 2 min, a bin every hour
    assert transitions(out) == [("wl", "offline", "silent")]
    assert h.tolerance_ms("waste_container") == 3 * 3600_000


def test_last_will_wins_at_once_and_only_a_newer_reading_makes_online_again():
    p, h = new_partition()
    out = Outputs()
    p.process(reading("wl", T0, T0 + 10), 0, T0 + 10, out)
    p.process(status("wl", "offline", T0 + 1000), 1, T0 + 1000, out)  # the broker fired the last will
    # a reading the gateway received before the will (in flight): the device stays offline
    p.process(reading("wl", T0 + 500, T0 + 900), 2, T0 + 1001, out)
    assert transitions(out) == [("wl", "online", "reading"), ("wl", "offline", "status_message")]
    p.process(reading("wl", T0 + 5000, T0 + 5010), 3, T0 + 5010, out)  # reconnected
    assert transitions(out)[-1] == ("wl", "online", "reading")
    times = [orjson.loads(v)["time"] for t, _, v in out.records if t == "device-status"]
    assert times == sorted(times) and len(set(times)) == 3


def test_status_messages_apply_in_time_order_and_repeat_nothing():
    p, h = new_partition()
    out = Outputs()
    p.process(status("wl", "online", T0), 0, T0, out)
    p.process(status("wl", "online", T0 + 5), 1, T0 + 5, out)  # no change: nothing emitted
    p.process(status("wl", "offline", T0 + 10), 2, T0 + 10, out)
    p.process(status("wl", "online", T0 + 7), 3, T0 + 11, out)  # older than the offline: ignored
    assert transitions(out) == [("wl", "online", "status_message"), ("wl", "offline", "status_message")]
    # an offline device is not "silent": no further transition however long it stays quiet
    p.flush(out, now_ms=T0 + 100 * TOL)
    assert transitions(out)[-1] == ("wl", "offline", "status_message")


def test_online_message_starts_the_silence_timer():
    p, h = new_partition()
    out = Outputs()
    p.flush(out, now_ms=T0)
    p.process(status("wl", "online", T0), 0, T0, out)
    p.flush(out, now_ms=T0 + TOL + 1)
    assert transitions(out) == [("wl", "online", "status_message"), ("wl", "offline", "silent")]


def test_a_lagging_worker_does_not_mistake_its_backlog_for_silence():
    p, h = new_partition()
    out = Outputs()
    lag = 2 * TOL  # the worker works through input the gateway received this long ago
    p.flush(out, now_ms=T0 + lag)
    p.process(reading("wl", T0, T0), 0, T0 + lag, out)
    p.flush(out, now_ms=T0 + lag + 1000)  # its activity counts from the worker's clock
    assert transitions(out) == [("wl", "online", "reading")]
    p.flush(out, now_ms=T0 + lag + TOL + 1)  # nothing more from it for a whole tolerance: silent
    assert transitions(out) == [("wl", "online", "reading"), ("wl", "offline", "silent")]


def roundtrip(payload):
    return orjson.loads(orjson.dumps(payload))


def test_state_survives_snapshot_and_restore_with_a_grace_period():
    p, h = new_partition()
    out = Outputs()
    p.flush(out, now_ms=T0)
    p.process(reading("wl", T0, T0), 0, T0, out)
    p.process(status("bin", "offline", T0 + 5), 1, T0 + 5, out)
    p.offset = 1
    full = roundtrip(p.snapshot(full=True))
    p.process(reading("wl", T0 + 30_000, T0 + 30_000), 2, T0 + 30_000, out)
    p.offset = 2
    delta = roundtrip(p.snapshot(full=False))
    assert set(delta["h"][STATUS_TYPE]["d"]) == {"wl"}  # only what changed

    q, h2 = new_partition()
    q.restore(full)
    q.restore(delta)
    assert h2.devices == h.devices
    out2 = Outputs()
    # the worker restarts much later: each device gets a full tolerance from the restart
    q.flush(out2, now_ms=T0 + 5 * TOL)
    assert transitions(out2) == []
    q.flush(out2, now_ms=T0 + 6 * TOL + 1)
    assert transitions(out2) == [("wl", "offline", "silent")]
    # the restored offline device does not come back online from nothing, and stays offline
    q.process(status("bin", "offline", T0 + 6), 3, T0 + 6 * TOL, out2)
    assert transitions(out2) == [("wl", "offline", "silent")]


def test_unknown_and_malformed_status_are_dead_lettered():
    p, h = new_partition()
    out = Outputs()
    p.process(status("nobody", "online", T0), 0, T0, out)
    p.process(status("wl", "asleep", T0), 1, T0, out)
    assert transitions(out) == []
    assert [orjson.loads(v)["reason"] for t, _, v in out.records if t == "dlq"] == ["unknown_device", "invalid_payload"]


def test_a_retained_status_of_unknown_age_sets_only_an_unknown_device():
    # the gateway stamps a retained status replayed on (re)subscription with time 0
    p, h = new_partition()
    out = Outputs()
    p.process(reading("wl", T0, T0), 0, T0, out)
    p.process(status("wl", "offline", 0), 1, T0 + 10, out)  # the old will, replayed: ignored
    p.process(status("bin", "offline", 0), 2, T0 + 10, out)  # nothing known about the bin: taken
    assert transitions(out) == [("wl", "online", "reading"), ("bin", "offline", "status_message")]
    p.process(reading("bin", T0, T0, 0.5, "fillingLevel"), 3, T0 + 20, out)
    assert transitions(out)[-1] == ("bin", "online", "reading")
