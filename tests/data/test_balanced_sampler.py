"""Class-balanced source sampling (``data.source_sampler: balanced``) and simulated class proportions
(``data.source_class_fractions`` / ``data.target_class_fractions``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tlframe.data import DataError, SyntheticDomain, TransferDataModule
from tlframe.data.samplers import ClassBalancedSampler, EpochRandomSampler, item_seed
from tlframe.label_shift import long_tail_fractions
from tlframe.seeding import mix

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def long_tail_labels(num_classes: int = 10, head: int = 200, ratio: float = 10.0, seed: int = 0) -> np.ndarray:
    """Shuffled labels of a long-tailed set: class c has ``round(head * ratio ** (-c / (K - 1)))`` samples."""
    counts = [round(head * f) for f in long_tail_fractions(num_classes, ratio)]
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return labels[np.random.default_rng(seed).permutation(len(labels))]


def reference_epoch_random_order(size: int, num_samples: int, seed: int, epoch: int) -> list[int]:
    """The order of ``EpochRandomSampler`` before class-balanced sampling was added (its code, verbatim)."""
    gen = torch.Generator().manual_seed(mix(seed, 3, epoch))
    reps = math.ceil(num_samples / size)
    return torch.cat([torch.randperm(size, generator=gen) for _ in range(reps)])[:num_samples].tolist()


# ----------------------------------------------------------------------------- the sampler
def test_long_tail_classes_are_drawn_uniformly():
    labels = long_tail_labels()
    counts = np.bincount(labels)
    assert counts[0] == 200 and counts[-1] == 20  # imbalance ratio 10
    for num_samples in (5000, 4999, 333):
        sampler = ClassBalancedSampler(labels, num_samples, seed=7)
        drawn = np.bincount(labels[list(sampler)], minlength=10)
        assert drawn.sum() == num_samples
        assert drawn.max() - drawn.min() <= 1  # floor or ceil of num_samples / K: uniform, not just on average
    # within any window the frequencies stay uniform (the class sequence is made of permutations of the classes)
    order = labels[list(ClassBalancedSampler(labels, 5000, seed=7, start_epoch=3))]
    for start in range(0, 5000, 10):
        assert sorted(order[start:start + 10]) == list(range(10))
    freq = np.bincount(order[1234:1234 + 500], minlength=10) / 500
    assert np.abs(freq - 0.1).max() < 0.01
    # the default sampler follows the long tail instead
    plain = np.bincount(labels[list(EpochRandomSampler(len(labels), 5000, seed=7))], minlength=10) / 5000
    assert plain[0] > 5 * plain[-1]


def test_no_sample_repeats_within_its_class_until_the_class_is_exhausted():
    labels = long_tail_labels()
    order = np.asarray(list(ClassBalancedSampler(labels, 2000, seed=1)))
    for c in range(10):
        members = np.flatnonzero(labels == c)
        drawn = order[labels[order] == c]  # the class's draws, in order: 200 of each class
        n = len(members)
        for start in range(0, len(drawn) - n + 1, n):  # successive full permutations of the class
            assert sorted(drawn[start:start + n]) == sorted(members)
        tail = drawn[(len(drawn) // n) * n:]
        assert len(set(tail.tolist())) == len(tail)  # a partial pass has no repeats either


def test_order_is_a_pure_function_of_seed_and_epoch():
    labels = long_tail_labels()
    a = ClassBalancedSampler(labels, 300, seed=3)
    first, second = list(a), list(a)
    assert first != second  # a fresh order each epoch
    b = ClassBalancedSampler(labels, 300, seed=3, start_epoch=1)
    assert list(b) == second  # a resumed run at epoch 1 continues the sequence
    b.set_epoch(0)
    assert list(b) == first
    assert list(ClassBalancedSampler(labels.copy(), 300, seed=3)) == first  # a fresh object (another DDP rank)
    assert list(ClassBalancedSampler(labels, 300, seed=4)) != first
    assert len(a) == 300


def test_skip_gives_the_tail_of_the_full_order_and_item_seeds_work():
    labels = long_tail_labels()
    full = ClassBalancedSampler(labels, 300, seed=3, start_epoch=2)
    first, second = list(full), list(full)
    resumed = ClassBalancedSampler(labels, 300, seed=3, start_epoch=2, skip=64)
    assert len(resumed) == 300  # Lightning's batch count is unchanged
    assert list(resumed) == first[64:] and list(resumed) == second  # only the first epoch is shortened
    pairs = list(ClassBalancedSampler(labels, 300, seed=3, start_epoch=2, item_seeds=True))
    assert [i for i, _ in pairs] == first
    assert [s for _, s in pairs] == [item_seed(3, 2, pos) for pos in range(300)]
    assert list(ClassBalancedSampler(labels, 300, seed=3, start_epoch=2, skip=5, item_seeds=True)) == pairs[5:]


def test_ddp_shards_of_the_order_are_disjoint_and_cover_it():
    from lightning_fabric.utilities.distributed import DistributedSamplerWrapper

    labels = long_tail_labels()
    shards = [list(DistributedSamplerWrapper(ClassBalancedSampler(labels, 400, seed=5), num_replicas=2, rank=r,
                                             shuffle=False)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 200
    order = list(ClassBalancedSampler(labels, 400, seed=5))
    assert shards[0] == order[0::2] and shards[1] == order[1::2]  # the same order on each rank, sharded
    assert np.bincount(labels[shards[0] + shards[1]], minlength=10).tolist() == [40] * 10  # balanced over the ranks
    for shard in shards:  # and each rank draws every class with probability 1/10 (not exactly 20 times each)
        assert np.bincount(labels[shard], minlength=10).min() >= 10


def test_classes_without_samples_are_skipped_and_unlabelled_is_refused():
    labels = np.array([0, 0, 0, 0, 2, 2])
    drawn = np.bincount(labels[list(ClassBalancedSampler(labels, 100, seed=0))], minlength=3)
    assert drawn.tolist() == [50, 0, 50]
    with pytest.raises(ValueError, match="labelled"):
        ClassBalancedSampler(np.array([0, -1, 1]), 10)


def test_epoch_random_sampler_is_unchanged():
    for size, num_samples, seed, epoch in ((10, 25, 3, 0), (10, 25, 3, 5), (270, 96, 11, 2), (7, 7, 0, 1)):
        sampler = EpochRandomSampler(size, num_samples, seed=seed, start_epoch=epoch)
        assert list(sampler) == reference_epoch_random_order(size, num_samples, seed, epoch)
        assert list(sampler) == reference_epoch_random_order(size, num_samples, seed, epoch + 1)
        skipped = EpochRandomSampler(size, num_samples, seed=seed, start_epoch=epoch, skip=4, item_seeds=True)
        ref = reference_epoch_random_order(size, num_samples, seed, epoch)
        assert list(skipped) == [(i, item_seed(seed, epoch, p)) for p, i in enumerate(ref)][4:]


# ----------------------------------------------------------------------------- the data module
def synth(style: str = "source", n: int = 400, labelled: bool = True) -> SyntheticDomain:
    return SyntheticDomain(style, num_train=n, num_test=100, image_size=16, labelled=labelled)  # type: ignore[arg-type]


def test_data_module_default_sampler_is_the_random_one_unchanged(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "17")
    for kwargs in ({}, {"source_sampler": "random"}):
        dm = TransferDataModule(synth(), synth("target"), batch_size=8, iters_per_epoch=5, **kwargs)
        dm.setup("fit")
        source, target = dm.train_dataloader().flattened
        assert type(source.sampler) is EpochRandomSampler and type(target.sampler) is EpochRandomSampler
        assert list(source.sampler) == reference_epoch_random_order(len(dm.source_train), 40, mix(17, 0), 0)
        assert list(target.sampler) == reference_epoch_random_order(len(dm.target_train), 40, mix(17, 1), 0)


def test_data_module_balanced_source_on_a_long_tail(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    fractions = long_tail_fractions(10, 10)
    dm = TransferDataModule(synth(n=1000), synth("target", labelled=False), batch_size=20, iters_per_epoch=50,
                            source_class_fractions=fractions, source_sampler="balanced", val_fraction=0.1)
    dm.setup("fit")
    counts = dm.source_class_counts()
    assert counts[0] > 8 * counts[-1] and counts.sum() == len(dm.source_train)  # the source is long-tailed
    # labels are read without decoding a single image
    monkeypatch.setattr("tlframe.data.datasets.ArrayImageDataset.__getitem__",
                        lambda self, i: pytest.fail("an image was decoded to read labels"))
    loaders = dm.train_dataloader().flattened
    source, target = loaders[0].sampler, loaders[1].sampler
    assert isinstance(source, ClassBalancedSampler) and type(target) is EpochRandomSampler  # target: never by label
    labels = np.asarray(dm.source_train.dataset.labels)[dm.source_train.indices]
    drawn = np.bincount(labels[list(source)], minlength=10)
    assert drawn.tolist() == [100] * 10  # 1000 draws, uniform over classes
    monkeypatch.undo()
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    x, y = next(iter(dm.train_dataloader()))[0]["source"]
    assert x.shape == (20, 3, 32, 32) and sorted(y.tolist()) == sorted(list(range(10)) * 2)  # two of each class


def test_class_fractions_subsample_each_split_reproducibly():
    fractions = long_tail_fractions(10, 10)
    assert fractions[0] == 1.0 and fractions[-1] == pytest.approx(0.1)
    assert long_tail_fractions(10, 10, reverse=True) == fractions[::-1]

    def build(seed: int):
        dm = TransferDataModule(synth(n=1000), synth("target", n=1000, labelled=False), batch_size=8,
                                source_class_fractions=fractions, target_class_fractions=fractions[::-1],
                                split_seed=seed, val_fraction=0.2)
        dm.setup("fit")
        return dm

    dm = build(0)
    source = np.bincount(np.asarray(dm.source_train.dataset.labels)[dm.source_train.indices]
                         .tolist() + np.asarray(dm.source_val.dataset.labels)[dm.source_val.indices].tolist(),
                         minlength=10)
    assert source.tolist() == [round(100 * f) for f in fractions]  # 100 images per class in the synthetic train split
    assert dm.source_class_counts().sum() == round(0.8 * source.sum())
    target_train = np.asarray(dm.target_train.dataset.labels)[dm.target_train.indices]
    assert np.bincount(target_train, minlength=10).tolist() == [round(100 * f) for f in fractions[::-1]]
    assert np.bincount(np.asarray(dm.target_test.dataset.labels)[dm.target_test.indices], minlength=10).tolist() == \
        [round(10 * f) for f in fractions[::-1]]
    assert all(y == -1 for _, y in (dm.target_train[i] for i in range(5)))  # the target stays unlabelled
    assert build(0).source_train.indices == dm.source_train.indices
    assert build(1).source_train.indices != dm.source_train.indices


def test_bad_sampler_and_fractions_are_refused():
    with pytest.raises(DataError, match="source_sampler='bogus' is unknown"):
        TransferDataModule(synth(), synth("target"), source_sampler="bogus")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="one fraction in \\[0, 1\\] per class"):
        TransferDataModule(synth(), synth("target"), source_class_fractions=[1.0, 1.5])
    with pytest.raises(DataError, match="has 3 values but the domains have 10 classes"):
        TransferDataModule(synth(), synth("target"), source_class_fractions=[1.0, 0.5, 0.2]).setup("fit")


# ----------------------------------------------------------------------------- the command
def test_fit_through_the_cli_with_balanced_sampling(tmp_path, capsys):
    from tlframe.cli import TLFrameCLI, main
    from tlframe.module import TransferModule

    fractions = ",".join(f"{f:.4f}" for f in long_tail_fractions(10, 10))
    args = ["-c", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}/runs",
            "--data.source.init_args.num_train=300", "--data.target.init_args.num_train=100",
            "--data.source.init_args.num_test=32", "--data.target.init_args.num_test=32", "--data.batch_size=10",
            "--data.iters_per_epoch=3", "--trainer.max_epochs=1", "--insights.a_distance=false",
            "--insights.projector=false", f"--data.source_class_fractions=[{fractions}]",
            "--data.source_sampler=balanced", *QUIET]
    main(["fit", *args])
    assert "val/source_acc" in capsys.readouterr().out
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["source_sampler"] == "balanced"
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    # the loaders the command builds draw every class equally often from the long-tailed source
    cli = TLFrameCLI(TransferModule, TransferDataModule, seed_everything_default=0, run=False,
                     args=[a for a in args if not a.startswith("--trainer.logger")], auto_configure_optimizers=False)
    dm = cli.datamodule
    dm.setup("fit")
    assert dm.source_class_counts()[0] >= 8 * dm.source_class_counts()[-1]
    labels = np.concatenate([batch["source"][1].numpy() for batch, _, _ in dm.train_dataloader()])
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10
