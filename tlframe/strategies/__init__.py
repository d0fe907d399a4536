"""Adaptation strategies: choose one in YAML with ``strategy: {class_path: tlframe.strategies.FineTune}``."""

from tlframe.strategies.base import Progress, Strategy, StrategyOutput, TransferStep
from tlframe.strategies.finetune import FineTune, FrozenFeatures
from tlframe.strategies.adaptation import DANN, MMD, DomainDiscriminator

__all__ = ["Progress", "Strategy", "StrategyOutput", "TransferStep", "FineTune", "FrozenFeatures", "DANN", "MMD", "DomainDiscriminator"]
