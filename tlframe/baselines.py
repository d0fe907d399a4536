"""Baselines of a transfer run, derived from its resolved config: the yardsticks of negative transfer.

Negative transfer (Wang et al., CVPR 2019, "Characterizing and avoiding negative transfer"; Rosenstein et
al. 2005) is a transfer result worse than what the target data alone give. A run's two baselines:

- **source-only**: the same run (backbone, data, budget, seed, optimizer, fine-tuning recipe) with the
  strategy replaced by :class:`~tlframe.strategies.FineTune`, keeping every argument FineTune has (LR
  multipliers, freezing, label smoothing, class weights, and the fine-tuning ``regularization``: L2-SP, BSS,
  DELTA, which are part of the fine-tuning recipe) and dropping the adaptation's (its loss terms included);
  the target is then only evaluated, never trained on. So a DANN + L2-SP run is compared with FineTune +
  L2-SP: the difference is the adaptation alone. Only for runs whose strategy trains on the target (``uses_target``,
  extra loss ``terms``, or ``label_shift``, which reads the unlabelled target and is dropped from both baselines):
  any other run is its own source-only result. A source-free run (``data.source: null``, SHOT) has none: its
  source-only result is the source model it starts from (``model.weights``).
- **target-only**: FineTune trained on the *target* domain's labelled ``train`` split alone, reduced to
  ``labels_per_class`` images per class (``None``: all of them), and evaluated on the target ``test``
  split as the run is; the source is not used. Only when the target is labelled (for evaluation).

Each function takes and returns the full resolved config of a ``tlframe fit`` (a dict as in a run's
``config.yaml``) and never changes its input.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any, Optional

__all__ = ["BASELINES", "FINETUNE", "source_only_config", "target_only_config", "strategy_class"]

FINETUNE = "tlframe.strategies.FineTune"
#: FineTune arguments that use the target data (label-shift correction): reset to their defaults in both baselines.
TARGET_ARGS = ("label_shift", "label_shift_start_epoch", "label_shift_every_epoch", "label_shift_ridge")
BASELINES = ("source_only", "target_only")


def strategy_class(config: dict[str, Any]) -> type:
    """The strategy class named by ``model.strategy.class_path``."""
    path = ((config.get("model") or {}).get("strategy") or {}).get("class_path") or FINETUNE
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _finetune_strategy(strategy: dict[str, Any]) -> dict[str, Any]:
    """``FineTune`` with the arguments of ``strategy`` that FineTune accepts (the others are dropped)."""
    from tlframe.strategies import FineTune

    params = inspect.signature(FineTune.__init__).parameters
    accepted = set(params) - {"self"}
    # the label-shift correction reads the target: back to its defaults (so a resolved config's siblings equal
    # a plain FineTune run's resolved config, and the sweep reuses that run)
    init_args = {k: (params[k].default if k in TARGET_ARGS else v)
                 for k, v in (strategy.get("init_args") or {}).items() if k in accepted}
    return {"class_path": FINETUNE, "init_args": init_args}


def source_only_config(config: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The source-only sibling of ``config``, or ``None`` when its strategy does not train on the target."""
    init_args = (config["model"].get("strategy") or {}).get("init_args") or {}
    uses_target = (getattr(strategy_class(config), "uses_target", False) or init_args.get("terms")
                   or init_args.get("label_shift", "none") != "none")
    if not uses_target:
        return None  # neither the strategy, an extra loss term nor a label-shift correction uses the target
    if (config.get("data") or {}).get("source", 0) is None:
        return None  # source-free (SHOT): no source data to train on; its source-only result is its starting model
    out = copy.deepcopy(config)
    out["model"]["strategy"] = _finetune_strategy(config["model"]["strategy"])
    return out


def target_labelled(config: dict[str, Any]) -> bool:
    """Whether the target domain of ``config`` has labels (``labelled`` is not false)."""
    target = (config.get("data") or {}).get("target") or {}
    return (target.get("init_args") or {}).get("labelled", True) is not False


def target_only_config(config: dict[str, Any], labels_per_class: Optional[int] = None) -> Optional[dict[str, Any]]:
    """The target-only sibling of ``config`` (FineTune on ``labels_per_class`` labelled target train images per
    class), or ``None`` when the target has no labels or the run has several domains (multi-source DA, DG)."""
    data = config.get("data") or {}
    if data.get("sources") is not None or data.get("domains") is not None:
        return None  # several domains (MultiDomainDataModule): no single target to train on
    if not target_labelled(config):
        return None
    out = copy.deepcopy(config)
    out["model"]["strategy"] = _finetune_strategy(config["model"].get("strategy") or {})
    source = copy.deepcopy(config["data"]["target"])
    if isinstance(source.get("init_args"), dict) and "labelled" in source["init_args"]:
        source["init_args"]["labelled"] = True
    out["data"]["source"] = source
    out["data"]["source_samples_per_class"] = labels_per_class
    return out
