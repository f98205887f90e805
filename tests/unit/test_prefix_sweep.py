"""The engine's prefix sweep (issue 24, item 1): rows held back in an
engine come out grouped by prompt prefix, one pass at a time, so rows of
every partition on a worker run beside their prefix and none waits for ever."""

from __future__ import annotations

import random

from bitinglip.platform.tasks.engines.prefix_sweep import JOIN_S, PrefixSweep


def test_rows_added_in_any_order_come_out_grouped_by_prefix_and_equal_keys_keep_their_order() -> None:
    sweep = PrefixSweep()
    rng = random.Random(0)
    rows = [((p, 9, p), f"{p}-{i}") for p in (3, 1, 2) for i in range(5)]
    rng.shuffle(rows)
    for key, item in rows:
        sweep.add(key, item)
    assert len(sweep) == 15
    out = sweep.take(4) + sweep.take(100)
    assert [int(item[0]) for item in out] == [1] * 5 + [2] * 5 + [3] * 5
    for p in "123":  # equal keys: the order they came in
        assert [i for i in out if i[0] == p] == [i for _, i in rows if i[0] == p]
    assert len(sweep) == 0 and sweep.take(3) == []


def test_a_row_that_sorts_before_the_last_one_taken_waits_for_the_next_pass() -> None:
    sweep = PrefixSweep()
    for key in ([5], [7], [9]):
        sweep.add(key, key[0])
    assert sweep.take(2) == [5, 7]
    sweep.add([1], 1)  # behind the pass: next pass
    sweep.add([8], 8)  # ahead of it: this pass
    sweep.add([7], 77)  # equal to the last taken: this pass, beside its prefix
    assert sweep.take(10) == [77, 8, 9, 1]


def test_rows_that_keep_coming_ahead_cannot_hold_a_row_behind_the_pass_for_ever() -> None:
    """One job's partitions of a sorted corpus keep adding rows that sort after the last one taken; another
    tenant's row that sorts before it is taken once the pass has taken in as many late rows as it began with."""
    now = [0.0]
    sweep = PrefixSweep(clock=lambda: now[0])
    for k in (5, 6, 7):
        sweep.add([k], k)
    assert sweep.take(1) == [5]  # a pass of 3 rows is under way
    now[0] = JOIN_S + 0.1  # past the burst a job's start brings
    sweep.add([1], "behind")
    taken = []
    for k in range(8, 50):  # a stream of rows that always sort after the last one taken
        sweep.add([k], k)
        taken += sweep.take(1)
    assert taken[:6] == [6, 7, 8, 9, 10, "behind"]  # 3 late rows joined the pass; then the next pass begins
    assert sorted(x for x in taken if x != "behind") == list(range(6, 50))[:len(taken) - 1]


def test_the_rows_of_a_burst_join_the_pass_that_began_with_the_first_partition() -> None:
    """A job's partitions reach the engine one after another within moments: each one's rows join the pass
    the first began, however many there are, so every prefix runs once."""
    now = [0.0]
    sweep = PrefixSweep(clock=lambda: now[0])
    for p in range(4):
        sweep.add([p, 0], (p, 0))
    assert sweep.take(1) == [(0, 0)]  # the engine took the first partition's first row
    now[0] = JOIN_S / 2
    for part in range(1, 8):  # seven more partitions, 4 rows each, one per prefix
        for p in range(4):
            sweep.add([p, part], (p, part))
    out = sweep.take(100)
    prefixes = [p for p, _ in out]
    assert prefixes == sorted(prefixes)  # one pass: prefix 0's late rows (all after (0, 0)) included
    assert len(out) == 31
