"""Adaptation strategies: choose one in YAML with ``strategy: {class_path: tlframe.strategies.FineTune}``."""

from tlframe.strategies.base import Progress, Strategy, StrategyOutput, TransferStep
from tlframe.strategies.finetune import FineTune, FrozenFeatures

__all__ = ["Progress", "Strategy", "StrategyOutput", "TransferStep", "FineTune", "FrozenFeatures"]
