"""FID, Inception Score and precision/recall against independent implementations, on the same feature sets.

Peers: pytorch-fid's ``calculate_frechet_distance`` (scipy sqrtm, as ADM) and torch-fidelity's FID
(eigenvalues of the product), Inception Score (``isc_features_to_metric`` without shuffling: equal
consecutive splits, which are ADM's splits of 5000 when the count is a multiple of 5000) and precision/recall
(``calculate_precision_recall_full``, float32 Euclidean distances, k = 3). ADM's own loops for the parts no
peer has (a short last IS split; float16 distance blocks) are transcribed below from evaluator.py's
description, in numpy.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from tread_scale.evaluation.metrics import (FeatureStats, frechet_distance, inception_score, pairwise_sq_distances,
                                            precision_recall)


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative, correlated features like Inception's pool_3 (a ReLU then an average)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return np.abs(rng.standard_normal((n, d)) @ mix + shift).astype(np.float32)


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = FeatureStats(x.shape[1])
    s.update(torch.from_numpy(x))
    return s.mean_cov()


@pytest.mark.parametrize("d", [64, 256])
def test_fid_equals_pytorch_fid_and_torch_fidelity(d):
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    a, b = _features(3 * d, d, 0), _features(2 * d, d, 1, shift=0.3)
    (mu1, s1), (mu2, s2) = _stats(a), _stats(b)
    ours = frechet_distance(mu1, s1, mu2, s2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes scipy's deprecated disp=False
        assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), abs=1e-3)
    fa, fb = fid_features_to_statistics(torch.from_numpy(a)), fid_features_to_statistics(torch.from_numpy(b))
    theirs = fid_statistics_to_metric(fa, fb, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert ours > 1  # the sets differ: a trivial 0 would not test anything


def test_fid_retries_a_singular_product_and_checks_the_imaginary_part(monkeypatch, caplog):
    import scipy.linalg

    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(4), np.eye(4)
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def singular_once(m, *args, **kwargs):
        calls.append(m.copy())
        assert not args and not kwargs  # scipy's deprecated disp argument is not used
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(scipy.linalg, "sqrtm", singular_once)
    with caplog.at_level(logging.WARNING):  # as ADM, the offset enters the square root only: 8 - 2·4(1 + 1e-6)
        assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(-8e-6, rel=1e-6)
    assert len(calls) == 2 and np.allclose(calls[1], (1 + 1e-6) ** 2 * np.eye(4))  # eye*eps on both diagonals
    assert "singular" in caplog.text

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: np.eye(4) + 2e-3j * np.eye(4))
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(mu, sigma, mu, sigma)
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda m: np.eye(4) + 5e-4j * np.eye(4))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)  # small: the real part


def test_fid_does_not_use_scipys_deprecated_disp_argument():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((50, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        frechet_distance(a.mean(0), np.cov(a, rowvar=False), np.zeros(5), np.eye(5))


def _adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's compute_inception_score on logits (its softmax in float32, consecutive splits of split_size)."""
    z = logits.astype(np.float32)
    z = np.exp(z - z.max(1, keepdims=True))
    preds = z / z.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i: i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_uses_splits_of_5000_like_adm_and_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.standard_normal((10000, 1008)) * 4)
    mean, std = inception_score(logits)  # default: ADM's split size, 5000
    theirs = isc_features_to_metric(logits, splits=2, shuffle=False)
    assert mean == pytest.approx(theirs["inception_score_mean"], abs=1e-3)
    assert std == pytest.approx(theirs["inception_score_std"], abs=1e-3)
    assert mean == pytest.approx(_adm_inception_score(logits.numpy()), abs=1e-3)
    # ten splits of 1000 (the former default) give another number: the split size matters
    assert abs(isc_features_to_metric(logits, splits=10, shuffle=False)["inception_score_mean"] - mean) > 1
    # a short last split counts like the others, as in ADM (12000 = 5000 + 5000 + 2000)
    more = torch.from_numpy(rng.standard_normal((12000, 1008)) * 4)
    assert inception_score(more)[0] == pytest.approx(_adm_inception_score(more.numpy()), abs=1e-3)


def test_inception_score_of_network_logits_equals_torch_fidelity(ours, fidelity):
    """End to end: ADM's IS input (no bias) of 4 images, one split, equals torch-fidelity's on logits_unbiased."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    mean = inception_score(ours["logits"])[0]
    theirs = isc_features_to_metric(fidelity["logits_unbiased"].float(), splits=1, shuffle=False)
    assert mean == pytest.approx(theirs["inception_score_mean"], abs=1e-3)
    # with the bias (the former softmax input) the score differs
    biased = isc_features_to_metric(fidelity["logits"].float(), splits=1, shuffle=False)["inception_score_mean"]
    assert abs(biased - mean) > 1e-3


def _pr_sets(n_real=600, n_fake=500, d=2048):
    real = torch.from_numpy(_features(n_real, d, 2))
    fake = torch.from_numpy(_features(n_fake, d, 3, shift=0.05))
    return real, fake


def _adm_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ADM's compute_prec_recall (ManifoldEstimator, one block): float16 distances, radii by np.partition."""
    def radii(x):
        d = _adm_distance_block_fp16(x, x)
        return np.partition(d, np.arange(k + 1), axis=1)[:, k]

    r_real, r_fake = radii(real), radii(fake)
    d = _adm_distance_block_fp16(real, fake)  # rows: reference batch, columns: samples
    precision = (d <= r_real[:, None]).any(0).mean()
    recall = (d <= r_fake[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_equals_torch_fidelity_in_float32_and_adm_in_float16():
    """In float32, ours equals torch-fidelity's; with ADM's float16 distances it equals ADM's loops exactly.

    The two differ: float16 squared distances of 2048-d features carry errors of ~1e-3 relative, enough
    to move samples across a k-NN radius (here 0.010 in precision and 0.003 in recall). ADM's numbers are
    the float16 ones, so they are the default.
    """
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = _pr_sets()
    tp, tr = calculate_precision_recall_full(fake, real, neighborhood=3, batch_size=10000)  # fake first
    assert 0.05 < tp < 0.95 and 0.05 < tr < 0.95  # neither trivial 0 nor 1
    assert precision_recall(real, fake, fp16=False) == pytest.approx((tp, tr), abs=1e-3)
    ours = precision_recall(real, fake)
    assert ours == pytest.approx(_adm_precision_recall(real.numpy(), fake.numpy()), abs=1e-12)
    assert ours == pytest.approx((tp, tr), abs=0.02)


def test_precision_recall_blocks_do_not_change_the_result():
    real, fake = _pr_sets(120, 90, 64)
    whole = precision_recall(real, fake)
    assert precision_recall(real, fake, row_batch_size=13, col_batch_size=9) == whole
    assert precision_recall(real, fake, row_batch_size=200, col_batch_size=11) == whole


def _adm_distance_block_fp16(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ADM's _batch_pairwise_distances on float16 inputs, one numpy float16 op per TF op (sums in float32)."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    nu = np.square(u16).astype(np.float32).sum(1).astype(np.float16).reshape(-1, 1)
    nv = np.square(v16).astype(np.float32).sum(1).astype(np.float16).reshape(1, -1)
    uv = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    return np.maximum(nu - np.float16(2) * uv + nv, np.float16(0)).astype(np.float32)


def test_float16_distances_are_adms():
    real, fake = _pr_sets(50, 40, 2048)
    ours = pairwise_sq_distances(real, fake)
    adm = _adm_distance_block_fp16(real.numpy(), fake.numpy())
    assert np.array_equal(ours.numpy(), adm)
    exact = torch.cdist(real.double(), fake.double()) ** 2
    assert (ours.double() - exact).abs().max() > 0  # float16: not the exact distances
    assert ((ours.double() - exact).abs() / exact).max() < 2e-3


def test_float16_overflow_falls_back_to_float32_like_adm():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = _pr_sets(80, 70, 256)
    real, fake = real * 100, fake * 100  # squared norms beyond float16's 65504
    assert not torch.isfinite(real.half().float().pow(2).sum(1).half()).all()
    d = pairwise_sq_distances(real, fake)
    assert torch.isfinite(d).all()
    assert torch.allclose(d.double(), torch.cdist(real.double(), fake.double()) ** 2, rtol=1e-5)
    tp, tr = calculate_precision_recall_full(fake, real, neighborhood=3)
    assert precision_recall(real, fake) == pytest.approx((tp, tr), abs=1e-3)
