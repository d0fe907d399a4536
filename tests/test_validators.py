"""Label-free validators and diagnostics against hand-computed values (tlframe.validators)."""

from __future__ import annotations

import math

import pytest
import torch

from tlframe.validators import (RowSample, SoftNeighborhoodDensity, confusion_image, prediction_entropy,
                                proxy_a_distance, soft_neighborhood_density)


def _binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_prediction_entropy_by_hand():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]])
    expected = [0.0, math.log(2), _binary_entropy(0.25)]
    assert prediction_entropy(probs).tolist() == pytest.approx(expected, abs=1e-6)
    assert float(prediction_entropy(torch.full((1, 10), 0.1))) == pytest.approx(math.log(10), abs=1e-6)


def test_snd_by_hand():
    # two points predicted class 0, one class 1: cosine similarities 1 (the pair) and 0
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    h_pair = _binary_entropy(1 / (1 + math.exp(-1 / 0.05)))  # softmax([1, 0] / 0.05) over the two neighbours
    assert float(soft_neighborhood_density(probs)) == pytest.approx((2 * h_pair + math.log(2)) / 3, rel=1e-5)
    h_pair_t1 = _binary_entropy(1 / (1 + math.exp(-1.0)))
    assert float(soft_neighborhood_density(probs, temperature=1.0)) == pytest.approx((2 * h_pair_t1 + math.log(2)) / 3,
                                                                                     rel=1e-5)
    # rows are L2-normalised first: scaling a row changes nothing; self-similarity is excluded
    assert float(soft_neighborhood_density(torch.full((3, 4), 0.25))) == pytest.approx(math.log(2), abs=1e-6)
    assert float(soft_neighborhood_density(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))) == 0.0  # one neighbour each
    assert float(soft_neighborhood_density(torch.tensor([[0.9, 0.1]]))) == 0.0


def test_snd_metric_uses_softmax_of_logits_and_caps_the_sample():
    logits = torch.randn(50, 5, generator=torch.Generator().manual_seed(0))
    metric = SoftNeighborhoodDensity(max_samples=1000)
    for chunk in logits.split(8):
        metric.update(chunk)
    assert float(metric.compute()) == pytest.approx(float(soft_neighborhood_density(logits.softmax(1))), rel=1e-5)
    capped = SoftNeighborhoodDensity(max_samples=10)
    for chunk in logits.split(8):
        capped.update(chunk)
    assert sum(k.numel() for k in capped.keys) <= 20 and math.isfinite(float(capped.compute()))
    assert math.isnan(float(SoftNeighborhoodDensity().compute()))


def test_row_sample_is_bounded_aligned_uniform_and_repeatable():
    x = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(1000)

    def sample(seed=0):
        rows = RowSample(("features", "labels"), max_samples=100, seed=seed)
        for xb, yb in zip(x.split(32), y.split(32)):
            rows.update(features=xb, labels=yb)
            assert sum(k.numel() for k in rows.keys) <= 200 + 32
        return rows.compute()

    out = sample()
    assert out["features"].shape == (100, 3) and out["labels"].shape == (100,)
    assert torch.equal(out["features"][:, 0].long(), out["labels"])  # columns stay aligned
    assert len(set(out["labels"].tolist())) == 100
    assert 300 < out["labels"].float().mean() < 700  # spread over the stream, not its head
    assert torch.equal(sample()["labels"], out["labels"]) and not torch.equal(sample(1)["labels"], out["labels"])
    small = RowSample(("v",), max_samples=10)
    small.update(v=torch.arange(4))
    assert sorted(small.compute()["v"].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="columns"):
        small.update(w=torch.arange(4))


def test_proxy_a_distance_separable_and_identical_domains():
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(400, 16, generator=gen)
    far = torch.randn(400, 16, generator=gen) + 3.0
    assert float(proxy_a_distance(source, far)) == pytest.approx(2.0)
    same = torch.randn(400, 16, generator=gen)
    assert abs(float(proxy_a_distance(source, same))) < 0.4
    assert float(proxy_a_distance(source, same)) == float(proxy_a_distance(source, same))  # seeded
    with torch.inference_mode():  # as inside Lightning's validation loop
        assert float(proxy_a_distance(source, far)) == pytest.approx(2.0)


def test_confusion_image_is_a_labelled_row_normalised_heatmap_that_fits_a_card():
    confmat = torch.tensor([[2, 0], [1, 3]])
    img = confusion_image(confmat, ["cat", "dog"])
    assert img.ndim == 3 and img.shape[0] == 3 and 0 <= float(img.min()) and float(img.max()) <= 1
    assert img.shape[2] <= 700 and img.shape[1] <= 700  # shown whole in a TensorBoard card
    # the cell colours are the row-normalised values: (0, 0) = 1 (darkest blue), (0, 1) = 0 (white)
    flat = img.permute(1, 2, 0).reshape(-1, 3)
    dark = torch.tensor([8, 48, 107]) / 255
    darkest = ((flat - dark).abs().max(dim=1).values < 1e-3).sum()
    assert 40 * 40 <= int(darkest) <= 48 * 48 + 200  # one cell (2/2, less its printed value) and the bar's top
    # class names and counts are drawn: other names give another image
    other = confusion_image(confmat, ["ant", "bee"])
    assert img.shape != other.shape or not torch.equal(img, other)
    # without names the indices are used; a 31-class matrix stays within the same size
    big = confusion_image(torch.randint(0, 9, (31, 31)), [f"class_name_{i}" for i in range(31)])
    assert big.shape[1] <= 700 and big.shape[2] <= 700
    assert confusion_image(confmat).shape[0] == 3