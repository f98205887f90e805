import random

from bitinglip.platform.tasks.batching import padding_ratio, plan_batches


def test_every_row_in_exactly_one_batch_and_budget_kept() -> None:
    rng = random.Random(1)
    costs = [rng.randint(1, 300) for _ in range(2000)]
    batches = plan_batches(costs, budget=4096, max_rows=512)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(costs)))
    for b in batches:
        assert len(b) <= 512
        assert len(b) == 1 or len(b) * max(costs[i] for i in b) <= 4096


def test_row_longer_than_budget_gets_its_own_batch() -> None:
    batches = plan_batches([10, 5000, 10], budget=100)
    assert [1] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2]


def test_sorted_batches_pad_less_than_corpus_order() -> None:
    rng = random.Random(2)
    costs = [int(rng.lognormvariate(3, 0.8)) + 2 for _ in range(3000)]
    sorted_batches = plan_batches(costs, budget=4096)
    naive = [list(range(i, min(i + 64, len(costs)))) for i in range(0, len(costs), 64)]
    assert padding_ratio(costs, sorted_batches) < 1.1 < padding_ratio(costs, naive)


def test_empty_input() -> None:
    assert plan_batches([], budget=10) == []
