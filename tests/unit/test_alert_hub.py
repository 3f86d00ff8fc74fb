"""The SSE fan-out's hold-back (AlertHub._dispatch) without a database: the table's answers are
played by a subclass. Seq order on the stream is what lets a client's Last-Event-ID never skip an
event that committed late."""

from __future__ import annotations

import asyncio
from typing import Any

from arus.routes.alerts import AlertHub


class ScriptedHub(AlertHub):
    """`in_flight` answers the lock check in turn (the last answer repeats); `visible` is what the
    table shows when asked which holes have committed."""

    def __init__(self, in_flight: list[bool], visible: set[int]) -> None:
        super().__init__("postgresql://unused", pool=None)  # type: ignore[arg-type]
        self.in_flight, self.visible = in_flight, visible
        self.lock_checks = 0

        async def fetch(_pool: Any, _where: str, params: list[Any], limit: int | None = None) -> list[dict[str, Any]]:
            return [{"seq": s, "alert": {}} for s in sorted(params[0])]

        self.fetch = fetch  # type: ignore[assignment]

    async def _writers_in_flight(self) -> bool:
        self.lock_checks += 1
        return self.in_flight[min(self.lock_checks, len(self.in_flight)) - 1]

    async def _committed(self, seqs: set[int]) -> set[int]:
        return seqs & self.visible


async def _sent(hub: AlertHub, notified: list[int], expect: int) -> list[int]:
    hub.high = 2
    for s in (1, 2):
        hub._recent.append(s)
        hub._recent_set.add(s)
    sub = hub.subscribe()
    task = asyncio.create_task(hub._dispatch())
    try:
        for s in notified:
            hub._pending.put_nowait(s)
        got = []
        for _ in range(expect):
            msg = await asyncio.wait_for(sub.queue.get(), timeout=5)
            assert msg is not None
            got.append(msg["seq"])
        await asyncio.sleep(0)
        assert sub.queue.empty(), "nothing is sent twice"
        return got
    finally:
        task.cancel()


def test_a_hole_committed_before_its_notification_is_read_is_taken_from_the_table():
    # The writer of seq 3 was in flight, then committed; its NOTIFY has not been read yet.
    hub = ScriptedHub(in_flight=[True, True, False], visible={3})
    assert asyncio.run(_sent(hub, [4], expect=2)) == [3, 4]
    assert hub.lock_checks == 3


def test_the_late_notification_of_a_hole_already_sent_is_not_sent_again():
    hub = ScriptedHub(in_flight=[False], visible={3})
    assert asyncio.run(_sent(hub, [4, 3], expect=2)) == [3, 4]


def test_a_permanent_hole_costs_no_wait():
    # seq 3 was rolled back (or ON CONFLICT DO NOTHING): no writer in flight, nothing in the table.
    hub = ScriptedHub(in_flight=[False], visible=set())
    assert asyncio.run(_sent(hub, [4], expect=1)) == [4]
    assert hub.lock_checks == 1


def test_a_failing_lock_check_holds_until_the_deadline_then_sends(monkeypatch):
    import arus.routes.alerts as alerts

    monkeypatch.setattr(alerts, "HOLD_BACK_S", 0.05)
    hub = ScriptedHub(in_flight=[True], visible=set())  # what _writers_in_flight answers on an error
    assert asyncio.run(_sent(hub, [4], expect=1)) == [4]
    assert hub.lock_checks > 1
