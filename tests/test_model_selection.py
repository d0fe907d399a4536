"""DomainBed's model selection (training-domain validation, leave-one-domain-out, the test-domain oracle) and
hyper-parameter selection on hand-made records."""

from __future__ import annotations

import math

import pytest
import torch

from tlframe.model_selection import (HparamSelection, Selection, leave_one_domain_out, select_hparams,
                                     test_domain_oracle, training_domain_validation)


def rec(step, source=None, target=None, target_out=None, validation=None):
    out = {"step": step}
    for key, value in (("val/source_acc", source), ("val/target_acc", target), ("val/target_out_acc", target_out),
                       ("val/validation_domain_acc", validation)):
        if value is not None:
            out[key] = value
    return out


RUN = [rec(300, 0.80, 0.61, 0.66), rec(100, 0.70, 0.50, 0.52), rec(200, 0.85, 0.55, 0.60), rec(400, 0.85, 0.64, 0.70)]


def test_training_domain_validation_picks_the_best_mean_source_accuracy_earliest_on_ties():
    sel = training_domain_validation(RUN)
    assert sel == Selection(200, 0.85, 0.55, "training-domain validation")  # 200 and 400 tie: the earlier step
    assert training_domain_validation([rec(5, torch.tensor(0.9), torch.tensor(0.4))]).test_acc == pytest.approx(0.4)
    with pytest.raises(ValueError, match=r"'val/source_acc'.*TransferModule logs it"):
        training_domain_validation([rec(1, target=0.3)])
    with pytest.raises(ValueError, match="no records"):
        training_domain_validation([])


def test_test_domain_oracle_takes_the_last_step():
    sel = test_domain_oracle(RUN)
    assert sel == Selection(400, 0.70, 0.64, "test-domain validation (oracle)")
    with pytest.raises(ValueError, match=r"'val/target_out_acc'.*val_split='domain_test'"):
        test_domain_oracle([rec(1, 0.5, 0.4)])
    with pytest.raises(ValueError, match="'step'"):
        test_domain_oracle([{"val/target_acc": 0.3, "val/target_out_acc": 0.2}])


def test_leave_one_domain_out_averages_the_validation_domains_step_by_step():
    test_run = [rec(100, target=0.50), rec(200, target=0.55), rec(300, target=0.61), rec(400, target=0.64)]
    val_runs = {
        "a": [rec(100, validation=0.40), rec(200, validation=0.70), rec(300, validation=0.60), rec(400, validation=0.90)],
        "b": [rec(100, validation=0.60), rec(200, validation=0.50), rec(300, validation=0.70)],  # no step 400
        "c": [rec(100, validation=0.20), rec(200, validation=0.60), rec(300, validation=0.50), rec(400, validation=0.10)],
    }
    sel = leave_one_domain_out(test_run, val_runs, num_domains=4)
    # step means: 100 -> 0.4, 200 -> 0.6, 300 -> 0.6 (tie: the earlier), 400 skipped (b missing)
    assert sel.step == 200 and sel.val_acc == pytest.approx(0.6) and sel.test_acc == 0.55
    assert sel.method == "leave-one-domain-out cross-validation"
    with pytest.raises(ValueError, match="one per domain other than the test domain"):
        leave_one_domain_out(test_run, val_runs, num_domains=5)
    with pytest.raises(ValueError, match="no step has a record"):
        leave_one_domain_out(test_run, {"a": [rec(7, validation=0.1)]})
    with pytest.raises(ValueError, match=r"'val/validation_domain_acc'.*validation_domain"):
        leave_one_domain_out(test_run, {"a": [rec(100, target=0.1)]})
    with pytest.raises(ValueError, match="no validation runs"):
        leave_one_domain_out(test_run, {})


def test_select_hparams_picks_per_trial_and_reports_mean_std_and_stderr():
    def run(val, test):
        return [rec(1, val - 0.1, test - 0.1), rec(2, val, test)]

    runs = {
        "lr=1e-3": {0: run(0.80, 0.60), 1: run(0.70, 0.50), 2: run(0.75, 0.40)},
        "lr=1e-4": {0: run(0.90, 0.55), 1: run(0.60, 0.65), 2: run(0.75, 0.45)},  # trial 2: a tie on val_acc
    }
    result = select_hparams(runs, "training_domain_validation")
    assert isinstance(result, HparamSelection) and result.num_trials == 3
    assert {t: h for t, (h, _) in result.per_trial.items()} == {0: "lr=1e-4", 1: "lr=1e-3", 2: "lr=1e-4"}
    tests = [0.55, 0.50, 0.45]
    mean = sum(tests) / 3
    std = math.sqrt(sum((t - mean) ** 2 for t in tests) / 3)
    assert result.mean_test_acc == pytest.approx(mean) and result.std_test_acc == pytest.approx(std)
    assert result.stderr_test_acc == pytest.approx(std / math.sqrt(3))
    with pytest.raises(ValueError, match="val/target_out_acc"):  # these runs logged no out split
        select_hparams(runs, "test_domain_oracle")
    with pytest.raises(ValueError, match="unknown method"):
        select_hparams(runs, "best")


def test_select_hparams_with_the_oracle_leave_one_out_and_a_custom_method():
    oracle_runs = {"a": {0: [rec(1, 0.9, 0.5, 0.9), rec(2, 0.1, 0.6, 0.7)]}, "b": {0: [rec(2, 0.5, 0.4, 0.8)]}}
    oracle = select_hparams(oracle_runs, "test_domain_oracle")
    assert oracle.per_trial[0][0] == "b" and oracle.mean_test_acc == pytest.approx(0.4) and oracle.std_test_acc == 0.0
    assert oracle.method == "test-domain validation (oracle)"
    loo_runs = {
        "a": {0: ([rec(1, target=0.3), rec(2, target=0.4)], {"x": [rec(1, validation=0.5), rec(2, validation=0.6)]})},
        "b": {0: ([rec(1, target=0.7)], {"x": [rec(1, validation=0.55)]})},
    }
    loo = select_hparams(loo_runs, "leave_one_domain_out")
    assert loo.per_trial[0][0] == "a" and loo.per_trial[0][1].step == 2 and loo.mean_test_acc == pytest.approx(0.4)
    custom = select_hparams({"h": {0: RUN}}, lambda r: training_domain_validation(r, test_key="val/target_out_acc"))
    assert custom.mean_test_acc == pytest.approx(0.60)
