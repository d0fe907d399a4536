"""The counts a BBSE estimate needs, taken by a training run (``label_shift: bbse``; :mod:`tlframe.label_shift`).

``C[i, j]`` = images of the labelled source *validation* split predicted ``i`` with label ``j``, and ``mu[i]`` =
images of the unlabelled target *train* split predicted ``i`` (Lipton et al., ICML 2018): the current model in eval
mode, eval transform, each DDP rank on its shard, the counts summed over ranks.
"""

from __future__ import annotations

import torch

__all__ = ["label_shift_counts"]


@torch.no_grad()
def label_shift_counts(module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C (K, K), mu (K,))`` float64 counts for a :class:`~tlframe.module.TransferModule` attached to a trainer.

    The target's labels are never read. Draws no random numbers (a resumed run gets the same counts); every
    module's train/eval mode is restored afterwards.
    """
    trainer, k, device = module.trainer, module.num_classes, module.device
    source, target = trainer.datamodule.label_shift_loaders(module.global_rank, trainer.world_size)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    confusion = torch.zeros(k * k, dtype=torch.float64, device=device)
    predicted = torch.zeros(k, dtype=torch.float64, device=device)
    try:
        with trainer.precision_plugin.forward_context():
            for x, y in source:
                pred = module(x.to(device)).argmax(1)
                confusion += torch.bincount(pred * k + y.to(device), minlength=k * k).double()
            for x, _unused_labels in target:
                predicted += torch.bincount(module(x.to(device)).argmax(1), minlength=k).double()
    finally:
        for m, training in modes.items():
            m.train(training)
    if trainer.world_size > 1:
        confusion = trainer.strategy.reduce(confusion, reduce_op="sum")
        predicted = trainer.strategy.reduce(predicted, reduce_op="sum")
    return confusion.view(k, k), predicted
