"""``tlframe.baselines``: the source-only and target-only siblings derived from a resolved run config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tlframe.baselines import FINETUNE, source_only_config, target_only_config
from tlframe.cli import resolved_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dann_config() -> dict:
    return resolved_config(["fit", "-c", str(ROOT / "configs" / "quickstart.yaml"), "--model.strategy=tlframe.strategies.DANN",
                            "--model.strategy.init_args.trade_off=0.3", "--model.strategy.init_args.backbone_lr_mult=0.5",
                            "--model.strategy.init_args.label_smoothing=0.1", "--seed_everything=7"])


def test_resolved_config_is_the_full_run_config(dann_config):
    assert dann_config["seed_everything"] == 7
    strategy = dann_config["model"]["strategy"]
    assert strategy["class_path"] == "tlframe.strategies.DANN"
    assert strategy["init_args"]["trade_off"] == 0.3 and strategy["init_args"]["grl_max_steps"] == 1000  # defaults filled
    assert dann_config["data"]["source"]["init_args"]["style"] == "source"


def test_source_only_keeps_the_finetune_recipe_and_drops_the_adaptation(dann_config):
    before = copy.deepcopy(dann_config)
    sibling = source_only_config(dann_config)
    assert dann_config == before  # the input is not changed
    strategy = sibling["model"]["strategy"]
    assert strategy["class_path"] == FINETUNE
    assert strategy["init_args"]["backbone_lr_mult"] == 0.5 and strategy["init_args"]["label_smoothing"] == 0.1
    assert "trade_off" not in strategy["init_args"] and "grl_max_steps" not in strategy["init_args"]
    # everything else (data, budget, seed, optimizer) is the run's own
    assert {k: v for k, v in sibling.items() if k != "model"} == {k: v for k, v in dann_config.items() if k != "model"}
    assert {k: v for k, v in sibling["model"].items() if k != "strategy"} == {
        k: v for k, v in dann_config["model"].items() if k != "strategy"}


def test_a_run_that_does_not_train_on_the_target_is_its_own_source_only_baseline(dann_config):
    assert source_only_config(source_only_config(dann_config)) is None


def test_target_only_trains_on_k_labelled_target_train_images_per_class(dann_config):
    sibling = target_only_config(dann_config, labels_per_class=10)
    assert sibling["model"]["strategy"]["class_path"] == FINETUNE
    assert sibling["data"]["source"] == {**dann_config["data"]["target"],
                                         "init_args": {**dann_config["data"]["target"]["init_args"], "labelled": True}}
    assert sibling["data"]["target"] == dann_config["data"]["target"]  # still evaluated on the target test split
    assert sibling["data"]["source_samples_per_class"] == 10
    assert target_only_config(dann_config)["data"]["source_samples_per_class"] is None  # every labelled image


def test_no_target_only_baseline_without_target_labels(dann_config):
    unlabelled = copy.deepcopy(dann_config)
    unlabelled["data"]["target"]["init_args"]["labelled"] = False
    assert target_only_config(unlabelled, 10) is None


def test_a_source_free_run_has_no_source_only_sibling_but_a_target_only_one():
    shot = resolved_config(["fit", "-c", str(ROOT / "configs" / "digits" / "mnist2usps" / "shot.yaml")])
    assert shot["data"]["source"] is None and shot["model"]["strategy"]["class_path"] == "tlframe.strategies.SHOT"
    assert source_only_config(shot) is None  # its source-only result is the source model it starts from
    target_only = target_only_config(shot, labels_per_class=10)
    assert target_only["model"]["strategy"]["class_path"] == FINETUNE
    assert target_only["data"]["source"]["class_path"] == "tlframe.data.USPSDomain"


def test_a_multi_source_run_has_a_source_only_sibling_on_the_same_domains_and_no_target_only_one():
    config = resolved_config(["fit", "-c", str(ROOT / "configs" / "quickstart_domains.yaml"),
                              "--data.adapt_to_test_domain=true", "--model.strategy=tlframe.strategies.DANN",
                              "--model.strategy.num_domains=3"])
    sibling = source_only_config(config)
    assert sibling["model"]["strategy"]["class_path"] == "tlframe.strategies.FineTune"
    assert sibling["data"] == config["data"]  # the same three domains
    assert target_only_config(config, 10) is None
