"""Source-free adaptation: SHOT (Liang et al., ICML 2020), "Do we really need to access the source data?".

Two runs. **Phase 1** trains a source model as any source-only run, with SHOT's choices: label smoothing 0.1
(``FineTune(label_smoothing: 0.1)``) and a weight-normalised classifier (``model.weight_norm_classifier: true``).
**Phase 2** starts from that checkpoint with the target data only (``data.source: null``,
``model.weights: <phase-1 last.ckpt>``, ``model.weights_head: true``) and :class:`SHOT`: the classifier (the
source hypothesis) is frozen and the feature extractor (backbone + bottleneck) is trained with

    loss = pseudo_label_weight * CE(g(x_t), y_hat) + im_weight * [ 1/N sum_i H(p_i) - H(mean_i p_i) ]

(:func:`tlframe.losses.information_maximization`), where ``y_hat`` are the centroid pseudo-labels of
:func:`tlframe.pseudo_labels.centroid_pseudo_labels`, recomputed at the start of every epoch from the current
model over the whole target train split (eval mode, eval transform). ``pseudo_label_weight: 0`` is SHOT-IM.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.nn import functional as F

from tlframe.checks import ConfigError, check_number
from tlframe.data.errors import DataError
from tlframe.losses import information_maximization
from tlframe.pseudo_labels import centroid_pseudo_labels
from tlframe.strategies.base import StrategyOutput, TransferStep
from tlframe.strategies.finetune import FineTune

__all__ = ["SHOT"]


class SHOT(FineTune):
    """SHOT's adaptation phase: no source data, frozen classifier, information maximisation plus centroid
    pseudo-labels (see the module docstring).

    The pseudo-labels of every target train image, and the epoch of their computation, are the strategy's
    extra state (``strategy._extra_state`` in the checkpoint): a run resumed mid-epoch trains on the labels of
    the epoch it resumes, instead of labels from mid-epoch weights. Under DDP every rank labels the whole split
    (same weights, same images, in order: the same labels), each then training on its shard.
    Logs ``train/loss_pseudo_label``, ``train/loss_im`` and, per epoch, ``shot/pseudo_label_changed`` (the share of
    labels that changed) and, only when the target data carries labels (never used in a loss),
    ``shot/pseudo_label_acc``.

    Args:
        pseudo_label_weight: beta, SHOT's ``cls_par`` (0.1 in its digits commands, 0.3 for Office); 0: SHOT-IM
            (no pseudo-labels, no labelling pass).
        im_weight: SHOT's ``ent_par`` (1.0).
        diversity_weight: weight of the diversity term ``H(mean p)`` (SHOT's ``gent``: 1).
        epsilon: the ``eps`` of ``-sum p log(p + eps)`` (SHOT: 1e-5).
        centroid_rounds: refinements with hard assignments after the soft centroids (SHOT's code: 1).
        ``**kwargs``: the :class:`FineTune` arguments (``backbone_lr_mult``; SHOT's digits code trains backbone
            and bottleneck at the same LR).
    """

    uses_source = False
    uses_target = True
    target_indices = True

    def __init__(self, pseudo_label_weight: float = 0.3, im_weight: float = 1.0, diversity_weight: float = 1.0,
                 epsilon: float = 1e-5, centroid_rounds: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        check_number("pseudo_label_weight", pseudo_label_weight, low=0)
        check_number("im_weight", im_weight, low=0)
        check_number("diversity_weight", diversity_weight, low=0)
        check_number("epsilon", epsilon, low=0)
        check_number("centroid_rounds", centroid_rounds, low=0, integer=True)
        if len(self.regularization):
            raise ConfigError("SHOT does not take fine-tuning regularization (its loss has no source term to add "
                              "them to): remove regularization")
        if self.label_shift != "none" or self.class_weights != "none":
            raise ConfigError("SHOT trains without the source data: label_shift and class_weights (which need source "
                              "labels) must be none")
        self.pseudo_label_weight = float(pseudo_label_weight)
        self.im_weight = float(im_weight)
        self.diversity_weight = float(diversity_weight)
        self.epsilon = float(epsilon)
        self.centroid_rounds = int(centroid_rounds)
        self.pseudo_labels = torch.zeros(0, dtype=torch.long)
        self.pseudo_label_epoch = -1

    # -- state: the epoch's pseudo-labels ---------------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self.pseudo_label_epoch]), self.pseudo_labels.cpu()])

    def set_extra_state(self, state: Any) -> None:
        state = torch.as_tensor(state, dtype=torch.long).cpu()
        self.pseudo_label_epoch, self.pseudo_labels = int(state[0]), state[1:].clone()

    # -- the model ------------------------------------------------------------------------------------------------
    def attach(self, backbone: nn.Module, head: nn.Module, num_classes: int) -> None:
        super().attach(backbone, head, num_classes)
        head.classifier.requires_grad_(False)  # the source hypothesis stays as it is

    def on_train_start(self, progress: Any, trainer: Any) -> None:
        super().on_train_start(progress, trainer)
        split = getattr(trainer.datamodule, "target_train", None)
        if len(self.pseudo_labels) and split is not None and len(split) != len(self.pseudo_labels):
            raise DataError(
                f"SHOT: the checkpoint holds pseudo-labels for {len(self.pseudo_labels)} target images, but "
                f"data.target's train split has {len(split)}: resume with the data config of the run that wrote "
                "the checkpoint (or start a new run from it with model.weights)")

    def on_train_epoch_start(self, module: Any) -> None:
        if self.pseudo_label_weight == 0 or self.pseudo_label_epoch == module.current_epoch:
            return  # SHOT-IM, or resumed mid-epoch: the labels of this epoch are in the checkpoint
        previous = self.pseudo_labels
        labels, accuracy = self._label_target(module)
        self.pseudo_labels, self.pseudo_label_epoch = labels.cpu(), module.current_epoch
        logs = {}
        if len(previous) == len(labels):
            logs["shot/pseudo_label_changed"] = float((previous != self.pseudo_labels).float().mean())
        if accuracy is not None:
            logs["shot/pseudo_label_acc"] = accuracy
        rank_zero_info(f"tlframe: SHOT pseudo-labels for epoch {module.current_epoch}: {len(labels)} target images, "
                       f"per class {torch.bincount(self.pseudo_labels, minlength=module.num_classes).tolist()}"
                       + "".join(f", {k} {v:.4f}" for k, v in logs.items()))
        if logs:
            module.log_dict(logs, on_step=False, on_epoch=True, sync_dist=False)

    @torch.no_grad()
    def _label_target(self, module: Any) -> tuple[torch.Tensor, float | None]:
        """Centroid pseudo-labels of the whole target train split from the current model (eval mode; draws no
        random numbers; every module's mode restored). The accuracy against the target labels, when there are
        any, is returned for the logs only."""
        trainer, device = module.trainer, module.device
        modes = {m: m.training for m in module.modules()}
        module.eval()
        features, probs, labels = [], [], []
        try:
            with trainer.precision_plugin.forward_context():
                for x, y in trainer.datamodule.target_eval_loader():
                    f, logits = module.head(module.features(x.to(device)))
                    features.append(f.float())
                    probs.append(torch.softmax(logits.float(), dim=1))
                    labels.append(y)
        finally:
            for m, training in modes.items():
                m.train(training)
        pseudo = centroid_pseudo_labels(torch.cat(features), torch.cat(probs), self.centroid_rounds)
        y = torch.cat(labels).to(pseudo.device)
        known = y >= 0
        accuracy = float((pseudo[known] == y[known]).double().mean()) if bool(known.any()) else None
        return pseudo, accuracy

    def compute(self, step: TransferStep) -> StrategyOutput:
        if step.logits_t is None or step.idx_t is None:
            raise RuntimeError("SHOT needs target batches with each image's index (tlframe's TransferDataModule "
                               "serves them to a strategy with target_indices)")
        out = StrategyOutput(losses={"im": information_maximization(step.logits_t, self.epsilon, self.diversity_weight)},
                             weights={"im": self.im_weight})
        if self.pseudo_label_weight > 0:
            if len(self.pseudo_labels) == 0:
                raise RuntimeError("SHOT has no pseudo-labels yet: they are computed at the start of every epoch")
            target = self.pseudo_labels.to(step.idx_t.device)[step.idx_t]
            out.losses["pseudo_label"] = F.cross_entropy(step.logits_t.float(), target)
            out.weights["pseudo_label"] = self.pseudo_label_weight
        return out
