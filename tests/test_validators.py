"""Label-free validators and diagnostics against hand-computed values (tlframe.validators)."""

from __future__ import annotations

import math

import pytest
import torch

from tlframe import validators
from tlframe.validators import (DeepEmbeddedValidation, InformationMaximization, RowSample, SoftNeighborhoodDensity,
                                confusion_image, deep_embedded_validation, dev_risk, information_maximization,
                                prediction_entropy, proxy_a_distance, soft_neighborhood_density)


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


def test_information_maximization_by_hand_and_its_range():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # mean entropy log(2) / 2, mean prediction [0.75, 0.25]
    assert float(information_maximization(probs)) == pytest.approx(math.log(2) / 2 - _binary_entropy(0.25), abs=1e-6)
    assert float(information_maximization(torch.full((5, 4), 0.25))) == pytest.approx(0.0, abs=1e-6)  # uniform
    collapsed = torch.tensor([[1.0, 0.0, 0.0]]).repeat(6, 1)  # confident, no diversity
    assert float(information_maximization(collapsed)) == pytest.approx(0.0, abs=1e-6)
    assert float(information_maximization(torch.eye(3).repeat(2, 1))) == pytest.approx(-math.log(3), abs=1e-6)
    random = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)).softmax(1)
    assert -math.log(3) < float(information_maximization(random)) < 0  # minus a mutual information


def test_information_maximization_metric_accumulates_softmax_of_logits():
    logits = torch.randn(50, 5, generator=torch.Generator().manual_seed(0)) * 3
    metric = InformationMaximization(num_classes=5)
    assert math.isnan(float(metric.compute()))
    for chunk in logits.split(8):
        metric.update(chunk)
    assert float(metric.compute()) == pytest.approx(float(information_maximization(logits.softmax(1))), abs=1e-5)


def _slow_dev(weights: list[float], losses: list[float]) -> float:
    """DEV re-derived with plain floats: eta = -Cov(wl, w) / Var(w), both unbiased."""
    n = len(weights)
    weighted = [w * l for w, l in zip(weights, losses)]
    mean_w, mean_wl = sum(weights) / n, sum(weighted) / n
    cov = sum((a - mean_wl) * (w - mean_w) for a, w in zip(weighted, weights)) / (n - 1)
    var = sum((w - mean_w) ** 2 for w in weights) / (n - 1)
    eta = -cov / var
    return mean_wl + eta * mean_w - eta


def test_dev_risk_is_the_control_variate_formula():
    gen = torch.Generator().manual_seed(0)
    w, loss = torch.rand(37, generator=gen) * 3, torch.rand(37, generator=gen) * 2
    assert float(dev_risk(w, loss)) == pytest.approx(_slow_dev(w.tolist(), loss.tolist()), rel=1e-12)
    assert dev_risk(w, loss).dtype == torch.float64
    # constant weights (Var(w) = 0 up to rounding): no control variate, just mean(w l)
    constant = dev_risk(torch.full((10,), 0.1, dtype=torch.float64), loss[:10])
    assert float(constant) == pytest.approx(0.1 * float(loss[:10].double().mean()), rel=1e-12)
    assert math.isnan(float(dev_risk(w[:1], loss[:1])))
    with pytest.raises(ValueError, match="weights"):
        dev_risk(w, loss[:5])


def test_dev_weights_are_the_density_ratio_of_a_source_vs_target_classifier(monkeypatch):
    """With a fixed domain classifier s(x) = log P(source | x) / P(target | x) = -x_0, w = exp(x_0) n_fit / n_t."""
    gen = torch.Generator().manual_seed(1)
    source, target, losses = torch.randn(20, 3, generator=gen), torch.randn(30, 3, generator=gen), torch.rand(20)
    fits = []

    def fixed(x, y, steps, weight_decay):
        fits.append((x.dtype, y.tolist()))
        return lambda z: -z[:, 0]

    monkeypatch.setattr(validators, "_fit_logistic", fixed)
    dev = deep_embedded_validation(source, losses, target)
    # two cross-fitting folds of 10 source rows (label 1) each fitted with all 30 target rows (label 0)
    assert fits == [(torch.float64, [1.0] * 10 + [0.0] * 30)] * 2
    weights = [math.exp(x0) * 10 / 30 for x0 in source[:, 0].double().tolist()]
    assert float(dev) == pytest.approx(_slow_dev(weights, losses.double().tolist()), rel=1e-9)


def test_dev_of_identical_domains_is_the_mean_source_loss():
    gen = torch.Generator().manual_seed(0)
    source, target = torch.randn(1000, 16, generator=gen), torch.randn(1500, 16, generator=gen)
    losses = torch.rand(1000, generator=gen)
    dev = deep_embedded_validation(source, losses, target)
    assert float(dev) == pytest.approx(float(losses.double().mean()), rel=0.03)
    assert float(dev) == float(deep_embedded_validation(source, losses, target))  # seeded, deterministic
    assert math.isnan(float(deep_embedded_validation(source[:1], losses[:1], target)))


def test_dev_rises_when_target_like_source_samples_have_high_loss():
    gen = torch.Generator().manual_seed(0)
    source = torch.cat([torch.randn(200, 8, generator=gen), torch.randn(200, 8, generator=gen) + 1.0])
    target = torch.randn(600, 8, generator=gen) + 1.0  # like the second half of the source
    like = torch.arange(400) >= 200
    high_on_target_like = deep_embedded_validation(source, torch.where(like, 1.0, 0.1), target)
    low_on_target_like = deep_embedded_validation(source, torch.where(like, 0.1, 1.0), target)
    assert float(low_on_target_like) < 0.55 - 0.2 and float(high_on_target_like) > 0.55 + 0.2  # mean loss: 0.55


def test_dev_metric_samples_both_domains_and_resets():
    gen = torch.Generator().manual_seed(0)
    source, target, losses = torch.randn(60, 4, generator=gen), torch.randn(50, 4, generator=gen) + 0.5, torch.rand(60)
    metric = DeepEmbeddedValidation(max_samples=40)
    assert math.isnan(float(metric.compute()))
    for f, l in zip(source.split(16), losses.split(16)):
        metric.update("source", f, l)
    for f in target.split(16):
        metric.update("target", f)
    rows_s, rows_t = metric.source.compute(), metric.target.compute()
    assert rows_s["features"].shape == (40, 4) and rows_t["features"].shape == (40, 4)
    expected = deep_embedded_validation(rows_s["features"], rows_s["losses"], rows_t["features"])
    assert float(metric.compute()) == pytest.approx(float(expected), rel=1e-6)
    metric.reset()
    assert not metric.source.update_called and math.isnan(float(metric.compute()))
    with pytest.raises(ValueError, match="domain"):
        metric.update("source", source)  # no losses


def test_fit_logs_finite_im_and_dev(synthetic_dm, trainer_factory):
    from tlframe.module import TransferModule

    model = TransferModule("dtn", num_classes=10, validator_samples=16)
    trainer = trainer_factory(max_steps=2)
    trainer.fit(model, synthetic_dm(iters_per_epoch=2))
    logged = trainer.callback_metrics
    for key in ("val/target_im", "val/target_dev"):
        assert key in logged and math.isfinite(float(logged[key])), key
    assert -math.log(10) - 1e-5 <= float(logged["val/target_im"]) <= 1e-5
    trainer.test(model, synthetic_dm(), verbose=False)  # loaders [target, source]: DEV is computed after both
    for key in ("test/target_im", "test/target_dev"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    without_source = trainer.validate(model, synthetic_dm(val_fraction=0.0), verbose=False)[0]
    assert "val/target_im" in without_source and "val/target_dev" not in without_source  # DEV needs source rows
