"""MultiDomainDataModule: several sources and targets, leave one domain out, per-domain validation, errors."""

from __future__ import annotations

import pytest
import torch

from tlframe.data import DataError, MultiDomainDataModule, SyntheticDomain, TransferDataModule
from tlframe.module import MeanDomainAccuracy, _merge_domains
from tlframe.seeding import mix


def synth(style: str = "source", n: int = 120, n_test: int = 40, seed: int = 0, labelled: bool = True, **kw):
    return SyntheticDomain(style, num_train=n, num_test=n_test, seed=seed, labelled=labelled, **kw)  # type: ignore[arg-type]


def three(n: int = 120) -> list[SyntheticDomain]:
    return [synth(n=n, seed=0), synth(n=n + 10, seed=2), synth("target", n=n + 20, seed=1)]


def batches(loader, k: int = 3) -> list:
    out = []
    for i, (batch, _, _) in enumerate(loader):
        if i == k:
            break
        out.append(batch)
    return out


def test_one_source_one_target_gives_the_two_domain_modules_batches_and_splits(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    kw = dict(batch_size=8, iters_per_epoch=4, val_fraction=0.2, split_seed=3)
    pair = TransferDataModule(synth(), synth("target", labelled=False), **kw)
    multi = MultiDomainDataModule(sources=[synth()], targets=[synth("target", labelled=False)], **kw)
    pair.setup("fit")
    multi.setup("fit")
    assert sorted(multi.sources_val[0].indices) == sorted(pair.source_val.indices)
    for a, b in zip(batches(pair.train_dataloader(), 4), batches(multi.train_dataloader(), 4)):
        merged, fields = _merge_domains(b)
        for role in ("source", "target"):
            assert torch.equal(a[role][0], merged[role][0]) and torch.equal(a[role][1], merged[role][1])
        assert fields["num_source_domains"] == 1 and bool((fields["d_s"] == 0).all())
    assert multi.val_domains == ["source_synthetic_source", "target"] and multi.test_domains == ["target"]


def test_leave_one_domain_out_by_index_and_by_name():
    doms = three()
    dm = MultiDomainDataModule(domains=doms, test_domain=2, batch_size=8)
    assert dm.sources == doms[:2] and dm.heldout == [doms[2]] and dm.targets == []
    assert dm.val_domains == ["source_synthetic_source_0", "source_synthetic_source_1", "target"]
    by_name = MultiDomainDataModule(domains=doms, test_domain="synthetic-target", batch_size=8)
    assert by_name.heldout == [doms[2]]
    # the held-out domain as an unlabelled training target: multi-source DA from the same list
    msda = MultiDomainDataModule(domains=doms, test_domain=0, adapt_to_test_domain=True, batch_size=8)
    assert msda.sources == doms[1:] and msda.targets == [doms[0]] and msda.heldout == []


def test_training_batches_carry_every_domain_with_its_index(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    doms = three()
    dm = MultiDomainDataModule(domains=doms, test_domain=0, adapt_to_test_domain=True, batch_size=6,
                               target_batch_size=4, iters_per_epoch=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    got = batches(loader, 10)
    assert len(got) == 5 == dm.num_train_batches()
    merged, fields = _merge_domains(got[0])
    assert merged["source"][0].shape == (12, 3, 32, 32) and merged["target"][0].shape == (4, 3, 32, 32)
    assert fields["d_s"].tolist() == [0] * 6 + [1] * 6 and fields["d_t"].tolist() == [0] * 4
    assert fields["num_source_domains"] == 2 and fields["num_target_domains"] == 1
    # each source domain draws its own permutations (different seeds), and a rerun draws the same ones
    samplers = [dl.sampler for dl in loader.flattened]
    assert samplers[0].seed == mix(0, 0) and samplers[1].seed == mix(0, 101) and samplers[2].seed == mix(0, 1)
    again = MultiDomainDataModule(domains=three(), test_domain=0, adapt_to_test_domain=True, batch_size=6,
                                  target_batch_size=4, iters_per_epoch=5)
    again.setup("fit")
    assert all(torch.equal(a["sources"][1][0], b["sources"][1][0]) for a, b in zip(got, batches(again.train_dataloader(), 10)))


def test_split_batch_divides_the_total_over_the_sources():
    dm = MultiDomainDataModule(domains=three(), test_domain=2, batch_size=16, split_batch=True)
    assert dm.batch_size == 8
    with pytest.raises(DataError, match=r"batch_size=15 does not split evenly over 2 sources: give a multiple of 2"):
        MultiDomainDataModule(domains=three(), test_domain=2, batch_size=15, split_batch=True)


def test_per_domain_validation_splits_holdout_and_domain_test():
    dm = MultiDomainDataModule(domains=three(), test_domain=2, batch_size=8, val_fraction=0.25, split_seed=1)
    dm.setup("fit")
    assert [len(v) for v in dm.sources_val] == [30, 32] and [len(t) for t in dm.sources_train] == [90, 98]
    for train, val in zip(dm.sources_train, dm.sources_val):
        assert not set(train.indices) & set(val.indices)
    assert [len(dl.dataset) for dl in dm.val_dataloader()] == [30, 32, 40]
    # DomainBed's protocol: train on each source's train split, validate on its test split; the held-out domain is
    # scored on its train split (DomainBed's "in", reported) and its test split ("out", the oracle's signal)
    dbed = MultiDomainDataModule(domains=three(), test_domain=2, batch_size=8, val_split="domain_test")
    dbed.setup("fit")
    assert dbed.val_domains == ["source_synthetic_source_0", "source_synthetic_source_1", "target", "target_out"]
    assert [len(t) for t in dbed.sources_train] == [120, 130]
    assert [len(dl.dataset) for dl in dbed.val_dataloader()] == [40, 40, 140, 40]
    assert dbed.test_domains == ["target", "target_out"]
    # a second held-out domain for leave-one-domain-out selection: never trained on
    lodo = MultiDomainDataModule(domains=three(), test_domain=2, validation_domain=1, batch_size=8)
    lodo.setup("fit")
    assert len(lodo.sources) == 1 and lodo.val_domains[-1] == "validation_domain"
    assert len(lodo.val_dataloader()[-1].dataset) == 130


@pytest.mark.parametrize("kwargs, message", [
    (dict(domains="three"), r"data.domains needs data.test_domain"),
    (dict(domains="three", test_domain=3), r"test_domain=3 is out of range: data.domains has 3 domains"),
    (dict(domains="three", test_domain="mnist"), r"test_domain='mnist' is not a domain of data.domains"),
    (dict(domains="three", test_domain=1, validation_domain=1), r"validation_domain and test_domain are both"),
    (dict(domains="three", test_domain=0, sources="one"), r"either data.domains with data.test_domain .* not both"),
    (dict(sources="one", test_domain=0), r"data.test_domain / validation_domain / adapt_to_test_domain pick from"),
    (dict(sources="one"), r"data.targets is empty and there is no held-out domain"),
    (dict(sources=[], targets="one"), r"data.sources is empty"),
    (dict(domains="three", test_domain=0, val_split="bogus"), r"val_split='bogus' is unknown"),
])
def test_bad_arguments_name_the_problem(kwargs, message):
    values = {"three": three(), "one": [synth()]}
    kwargs = {k: values.get(v, v) if isinstance(v, str) and k in ("domains", "sources", "targets") else v
              for k, v in kwargs.items()}
    with pytest.raises(DataError, match=message):
        MultiDomainDataModule(batch_size=8, **kwargs)


def test_data_errors_name_the_domain():
    odd = synth(seed=5, class_subset=[0, 1, 2])
    dm = MultiDomainDataModule(domains=[synth(), odd, synth("target", seed=1)], test_domain=2, batch_size=4)
    with pytest.raises(DataError, match=r"domain synthetic-source has classes \['disc', .*every domain needs the same"):
        dm.setup("fit")
    dm = MultiDomainDataModule(sources=[synth(), synth(seed=3, labelled=False)], targets=[synth("target")], batch_size=4)
    with pytest.raises(DataError, match=r"source domain synthetic-source is unlabelled: every source must be labelled"):
        dm.setup("fit")
    dm = MultiDomainDataModule(sources=[synth(), synth(n=20, seed=3)], targets=[synth("target")], batch_size=32)
    with pytest.raises(DataError, match=r"source batch size 32 is larger than the train split of source domain "
                                        r"synthetic-source \(18 images\)"):
        dm.setup("fit")
    dm = MultiDomainDataModule(domains=three(), test_domain=2, batch_size=4)
    with pytest.raises(DataError, match="source-free strategies"):
        dm.set_training_domains(source=False)
    with pytest.raises(DataError, match="FixMatch / Mean Teacher take the two-domain"):
        dm.set_target_views(2)


def test_mean_domain_accuracy_is_the_mean_of_the_per_domain_accuracies():
    metric = MeanDomainAccuracy(3)
    logits = torch.eye(4)
    metric.update(logits[:2], torch.tensor([0, 1]), 0)             # domain 0: 2 / 2
    metric.update(logits, torch.tensor([0, 0, 0, 3]), 1)           # domain 1: 2 / 4
    assert metric.compute().item() == pytest.approx((1.0 + 0.5) / 2)  # domain 2 has no rows: left out
    metric.update(logits[:1], torch.tensor([1]), 2)                # domain 2: 0 / 1
    assert metric.compute().item() == pytest.approx((1.0 + 0.5 + 0.0) / 3)
