"""The adaptive fetch wait (infra/fetch_wait.py): starved consumers raise it, calm ones bring it back."""

from __future__ import annotations

import pytest

from infra.fetch_wait import FetchWait


def test_stays_at_the_floor_while_records_come_or_nothing_is_waiting() -> None:
    w = FetchWait(20, 1000)
    for i in range(1000):
        now = i * 0.02
        assert w.observe(now, got_records=i % 2 == 0, behind=False) == 20
        assert w.observe(now, got_records=True, behind=True) == 20


def test_doubles_only_after_staying_starved_for_a_few_waits() -> None:
    w = FetchWait(20, 1000)
    assert w.observe(0.0, got_records=False, behind=True) == 20
    assert w.observe(0.05, got_records=False, behind=True) == 20  # 50 ms < 3 waits of 20 ms
    assert w.observe(0.06, got_records=False, behind=True) == 40
    # the clock restarts at each raise: 3 x 40 ms more before the next
    assert w.observe(0.17, got_records=False, behind=True) == 40
    assert w.observe(0.18, got_records=False, behind=True) == 80


def test_a_record_between_empty_polls_resets_the_starvation_clock() -> None:
    w = FetchWait(20, 1000)
    w.observe(0.0, got_records=False, behind=True)
    w.observe(0.05, got_records=True, behind=True)
    assert w.observe(0.07, got_records=False, behind=True) == 20
    assert w.observe(0.12, got_records=False, behind=True) == 20
    assert w.observe(0.13, got_records=False, behind=True) == 40


def test_capped_at_the_ceiling() -> None:
    w = FetchWait(20, 300)
    now = 0.0
    for _ in range(50):
        w.observe(now, got_records=False, behind=True)
        now += 1.0
    assert w.wait_ms == 300


def test_relaxes_halving_toward_the_floor_after_calm_periods() -> None:
    w = FetchWait(20, 1000, relax_after_s=30.0)
    now = 0.0
    while w.wait_ms < 160:
        w.observe(now, got_records=False, behind=True)
        now += 0.5
    raised_at = now
    assert w.observe(raised_at + 10, got_records=True, behind=True) == 160  # too soon
    assert w.observe(raised_at + 31, got_records=True, behind=True) == 80
    assert w.observe(raised_at + 40, got_records=False, behind=False) == 80
    assert w.observe(raised_at + 62, got_records=False, behind=False) == 40
    assert w.observe(raised_at + 93, got_records=True, behind=False) == 20
    assert w.observe(raised_at + 500, got_records=True, behind=False) == 20


@pytest.mark.parametrize(("floor", "ceiling"), [(0, 10), (50, 10)])
def test_refuses_a_floor_above_the_ceiling_or_zero(floor: int, ceiling: int) -> None:
    with pytest.raises(ValueError, match="floor"):
        FetchWait(floor, ceiling)
