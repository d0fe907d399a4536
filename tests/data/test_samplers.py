from collections import Counter

from tlframe.data.samplers import EpochRandomSampler


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = EpochRandomSampler(10, 25, seed=3)
    first, second = list(a), list(a)
    assert first != second  # a fresh order each epoch
    b = EpochRandomSampler(10, 25, seed=3, start_epoch=1)
    assert list(b) == second  # a resumed run at epoch 1 continues the sequence
    b.set_epoch(0)
    assert list(b) == first
    assert list(EpochRandomSampler(10, 25, seed=4)) != first


def test_small_domain_cycles_through_full_permutations():
    order = list(EpochRandomSampler(10, 25, seed=0))
    assert len(order) == 25
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert max(Counter(order).values()) == 3
