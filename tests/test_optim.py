import pytest
import torch

from tlframe.optim import InverseDecayLR, apply_lr_multipliers, frozen_stage_count, stage_lr_multipliers


def test_stage_lr_multipliers_without_and_with_layer_decay():
    assert stage_lr_multipliers(3, 0.1, None) == [0.1, 0.1, 0.1]
    assert stage_lr_multipliers(3, 0.1, 0.5) == pytest.approx([0.025, 0.05, 0.1])


@pytest.mark.parametrize("freeze, every, progress, expected", [
    (2, None, 100, 2), (-1, None, 0, 5), (9, None, 0, 5),
    (3, 2, 0, 3), (3, 2, 1, 3), (3, 2, 2, 2), (3, 2, 5, 1), (3, 2, 6, 0), (3, 2, 60, 0),
])
def test_frozen_stage_count(freeze, every, progress, expected):
    assert frozen_stage_count(freeze, 5, every, progress) == expected


def test_inverse_decay_matches_formula_per_group():
    w = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [w[0]], "lr_mult": 1.0}, {"params": [w[1]], "lr_mult": 0.1}], lr=0.01)
    apply_lr_multipliers(opt)
    sched = InverseDecayLR(opt)
    for _ in range(1000):
        opt.step()
        sched.step()
    factor = (1 + 0.001 * 1000) ** -0.75
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * factor)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.001 * factor)
