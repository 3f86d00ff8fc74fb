"""Which checkpoints are full snapshots: the first after an assignment, then one every N, staggered."""

from __future__ import annotations

from stream_processors.runtime import checkpoint_kind


def _fulls(partition: int, full_every: int, checkpoints: int) -> list[int]:
    count, fulls = 0, []
    for i in range(checkpoints):
        full, count = checkpoint_kind(count, full_every, partition)
        if full:
            fulls.append(i)
    return fulls


def test_the_first_checkpoint_is_full_and_then_one_every_n() -> None:
    assert _fulls(0, 300, 1000) == [0, 300, 600, 900]


def test_partitions_take_their_full_snapshots_at_different_checkpoints() -> None:
    later = [set(_fulls(p, 300, 2000)) - {0} for p in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not later[a] & later[b], (a, b)
    # and no partition goes longer than N checkpoints without a full one (bounds a restore)
    for p in range(8):
        fulls = _fulls(p, 300, 2000)
        assert max(b - a for a, b in zip(fulls, fulls[1:], strict=False)) <= 300


def test_full_every_one_makes_every_checkpoint_full() -> None:
    assert _fulls(3, 1, 5) == [0, 1, 2, 3, 4]
