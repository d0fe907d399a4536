"""Adaptation strategies: choose one in YAML with ``strategy: {class_path: tlframe.strategies.FineTune}``.

Strategies that train on the target (:class:`Adaptation` and its subclasses: DANN, MMD, CDAN, JAN, MCC, MDD,
AFN, CORAL) take extra weighted loss ``terms`` (EntropyTerm, MCCTerm, BSPTerm, MMDTerm, JMMDTerm, CORALTerm,
AFNTerm, and the self-training FixMatchTerm and MeanTeacherTerm of :mod:`tlframe.strategies.self_training`):
see :mod:`tlframe.strategies.terms`. Every fine-tuning strategy (FineTune and the adaptation
strategies) takes ``regularization`` (L2SP, BSS, DELTA): see :mod:`tlframe.strategies.regularization`.
Domain generalisation over several training domains (DomainBed's ERM, CORAL, MMD, IRM, V-REx, GroupDRO, DANN and
CDANN, and MixStyle): :mod:`tlframe.strategies.domain_generalization`.
"""

from tlframe.strategies.base import Progress, Strategy, StrategyOutput, TransferStep
from tlframe.strategies.regularization import BSS, DELTA, L2SP, Regularizer
from tlframe.strategies.finetune import FineTune, FrozenFeatures
from tlframe.strategies.terms import (AFNTerm, Adaptation, BSPTerm, CORALTerm, EntropyTerm, JMMDTerm, LossTerm,
                                      MCCTerm, MMDTerm)
from tlframe.strategies.adaptation import DANN, MMD, DomainDiscriminator
from tlframe.strategies.shelf import AFN, CDAN, CORAL, JAN, MCC, MDD, L2PreservedDropout
from tlframe.strategies.source_free import SHOT
from tlframe.strategies.mcd import MCD
from tlframe.strategies.self_training import EMATeacher, FixMatch, FixMatchTerm, MeanTeacher, MeanTeacherTerm
from tlframe.strategies.domain_generalization import (ERM, IRM, DomainAdversarial, DomainCORAL, DomainMMD, GroupDRO,
                                                      MixStyle, VREx)

__all__ = ["Progress", "Strategy", "StrategyOutput", "TransferStep", "FineTune", "FrozenFeatures", "Adaptation",
           "DANN", "MMD", "DomainDiscriminator", "CDAN", "JAN", "MCC", "MDD", "AFN", "CORAL", "L2PreservedDropout",
           "LossTerm", "EntropyTerm", "MCCTerm", "BSPTerm", "MMDTerm", "JMMDTerm", "CORALTerm", "AFNTerm",
           "Regularizer", "L2SP", "BSS", "DELTA", "FixMatch", "FixMatchTerm", "MeanTeacher", "MeanTeacherTerm",
           "EMATeacher", "SHOT", "MCD", "ERM", "DomainCORAL", "DomainMMD", "IRM", "VREx", "GroupDRO",
           "DomainAdversarial", "MixStyle"]
