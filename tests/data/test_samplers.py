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


def test_skip_leaves_out_the_first_samples_of_the_first_epoch_only():
    full = EpochRandomSampler(10, 25, seed=3, start_epoch=2)
    first, second = list(full), list(full)
    resumed = EpochRandomSampler(10, 25, seed=3, start_epoch=2, skip=8)
    assert len(resumed) == 25  # Lightning's batch count is unchanged
    assert list(resumed) == first[8:] and list(resumed) == second


def test_item_seeds_are_a_function_of_seed_epoch_and_position():
    pairs = list(EpochRandomSampler(10, 25, seed=3, item_seeds=True))
    assert [i for i, _ in pairs] == list(EpochRandomSampler(10, 25, seed=3))
    assert len({s for _, s in pairs}) == 25  # one seed per draw, also for repeated images
    resumed = EpochRandomSampler(10, 25, seed=3, skip=5, item_seeds=True)
    assert list(resumed) == pairs[5:]
