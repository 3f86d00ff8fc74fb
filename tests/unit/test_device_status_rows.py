"""jember.device-status messages -> guarded UPDATEs of devices (record sink spec)."""

import pytest

from consumers.device_status_rows import SPECS, UPDATE_LAST_SEEN, UPDATE_STATUS, convert
from consumers.records import BadRecord
from consumers.rows import ms_to_datetime

T = 1_790_000_040_000


def test_transition_updates_status_guarded_by_time_and_last_seen_by_observation_time():
    writes = convert({"device_id": "wl-1", "status": "online", "reason": "reading", "time": T, "last_seen": T - 5})
    assert writes == [
        (UPDATE_STATUS, ("online", "reading", ms_to_datetime(T), "wl-1", ms_to_datetime(T),
                         "online", "reading", ms_to_datetime(T))),
        (UPDATE_LAST_SEEN, (ms_to_datetime(T - 5), "wl-1", ms_to_datetime(T - 5))),
    ]
    assert "status_time <= %s" in UPDATE_STATUS and "last_seen < %s" in UPDATE_LAST_SEEN
    assert SPECS[0].topic == "device-status"


def test_offline_without_observation_leaves_last_seen_alone():
    writes = convert({"device_id": "wl-1", "status": "offline", "reason": "status_message", "time": T,
                      "last_seen": None})
    assert [w[0] for w in writes] == [UPDATE_STATUS]


@pytest.mark.parametrize("msg", [
    {"device_id": "wl-1", "status": "asleep", "reason": "reading", "time": T},
    {"device_id": "wl-1", "status": "online", "reason": "magic", "time": T},
    {"device_id": "", "status": "online", "reason": "reading", "time": T},
    {"device_id": "wl-1", "status": "online", "reason": "reading", "time": "yesterday"},
    {"device_id": "wl-1", "status": "online", "reason": "reading", "time": T, "last_seen": 1.5},
])
def test_malformed_messages_are_bad_records(msg):
    with pytest.raises(BadRecord):
        convert(msg)


def test_device_rows_are_written_last_in_device_order_so_two_sinks_never_deadlock():
    from consumers.records import in_lock_order

    (spec,) = SPECS
    assert spec.lock_key is not None and spec.lock_key({"device_id": "wl-7"}) == "wl-7"
    keyed = [("wl-9", "status wl-9 #1"), (None, "alert a"), ("wl-2", "status wl-2"), (None, "alert b"),
             ("wl-9", "status wl-9 #2")]
    # unkeyed writes keep arrival order; device rows follow, sorted, one device's writes in their order
    assert in_lock_order(keyed) == ["alert a", "alert b", "status wl-2", "status wl-9 #1", "status wl-9 #2"]
