"""Weight checks, reference provenance, ADM reference batches, and the comparable-to-published label."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tread_scale.errors import DatasetError
from tread_scale.evaluation import inception as inception_mod
from tread_scale.evaluation.inception import STANDARD_WEIGHTS_SHA256, file_sha256, load_inception
from tread_scale.evaluation.metrics import (ADM_BATCH, IMAGES, PIPELINE, PIXEL_DATA, UNKNOWN, VAE_RECONSTRUCTIONS,
                                            ReferenceStats)
from tread_scale.evaluation.reference import PUBLISHED_NUM_SAMPLES, comparability, npz_images


def _stats(seed: int = 0, spatial: bool = True, **kw) -> ReferenceStats:
    rng = np.random.default_rng(seed)
    mu, mu_s = rng.standard_normal(2048), rng.standard_normal(2023)
    return ReferenceStats(mu, np.eye(2048), mu_s if spatial else None, np.eye(2023) if spatial else None, **kw)


def test_unknown_weights_load_with_a_warning_naming_the_expected_hash(inception_pth, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        net = load_inception(inception_pth)
    assert not net.standard_weights and net.weights_sha256 == file_sha256(inception_pth)
    assert STANDARD_WEIGHTS_SHA256 in caplog.text and "not comparable" in caplog.text
    caplog.clear()
    monkeypatch.setattr(inception_mod, "STANDARD_WEIGHTS_SHA256", file_sha256(inception_pth))
    with caplog.at_level(logging.WARNING):
        assert load_inception(inception_pth).standard_weights
    assert not caplog.records


def test_the_standard_hash_is_a_full_sha256_with_the_published_prefix():
    assert len(STANDARD_WEIGHTS_SHA256) == 64 and int(STANDARD_WEIGHTS_SHA256, 16) >= 0
    assert STANDARD_WEIGHTS_SHA256.startswith("6726825d")  # the prefix in pt_inception-2015-12-05-6726825d.pth


def test_statistics_keep_their_provenance(tmp_path):
    _stats(source=IMAGES, inception_sha256="ab" * 32, num_images=123).save(tmp_path / "s.npz")
    got = ReferenceStats.load(tmp_path / "s.npz")
    assert (got.source, got.inception_sha256, got.num_images, got.pipeline) == (IMAGES, "ab" * 32, 123, PIPELINE)
    assert got.mu_s.shape == (2023,) and not got.has_images
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:  # plain arrays: readable without pickle
        assert {"mu", "sigma", "mu_s", "sigma_s", "source", "pipeline"} <= set(z.files)


def test_an_npz_without_provenance_loses_its_spatial_statistics(tmp_path, caplog):
    s = _stats()
    np.savez(tmp_path / "old.npz", mu=s.mu, sigma=s.sigma, mu_s=s.mu_s, sigma_s=s.sigma_s)  # as tread-scale < v1
    with caplog.at_level(logging.WARNING):
        got = ReferenceStats.load(tmp_path / "old.npz")
    assert got.source == UNKNOWN and got.mu_s is None and "sFID against it is not reported" in caplog.text


def test_adm_reference_batches_are_recognised_and_their_images_streamed(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (11, 8, 6, 3), dtype=np.uint8)
    s = _stats()
    np.savez(tmp_path / "VIRTUAL_x.npz", arr_0=imgs, mu=s.mu, sigma=s.sigma, mu_s=s.mu_s, sigma_s=s.sigma_s)
    got = ReferenceStats.load(tmp_path / "VIRTUAL_x.npz")
    assert got.source == ADM_BATCH and got.has_images and np.array_equal(got.mu_s, s.mu_s)
    # every rank gets images rank, rank + W, ... in batches; together they are arr_0
    parts = [np.concatenate(list(npz_images(tmp_path / "VIRTUAL_x.npz", 2, r, 3))) for r in range(3)]
    assert all(np.array_equal(parts[r], imgs[r::3]) for r in range(3))
    assert np.array_equal(np.concatenate(list(npz_images(tmp_path / "VIRTUAL_x.npz", 4, limit=5))), imgs[:5])
    # images only: statistics come later, from the images
    np.savez(tmp_path / "images_only.npz", arr_0=imgs)
    assert ReferenceStats.load(tmp_path / "images_only.npz").mu is None


def test_bad_reference_files_are_named(tmp_path):
    s = _stats()
    np.savez(tmp_path / "wide.npz", mu=s.mu, sigma=s.sigma, mu_s=s.mu_s[:100], sigma_s=np.eye(100),
             source=np.array(IMAGES), pipeline=np.array(PIPELINE))
    with pytest.raises(DatasetError, match="wide.npz: mu_s/sigma_s have shapes"):
        ReferenceStats.load(tmp_path / "wide.npz")
    np.savez(tmp_path / "none.npz", x=np.zeros(3))
    with pytest.raises(DatasetError, match="none.npz: expected arrays 'mu' and 'sigma'"):
        ReferenceStats.load(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DatasetError, match="text.npz: not a readable .npz"):
        ReferenceStats.load(tmp_path / "text.npz")
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DatasetError, match="floats.npz: arr_0 is float32"):
        next(npz_images(tmp_path / "floats.npz", 2))


def test_comparable_only_with_standard_weights_real_reference_and_50k_samples():
    n = PUBLISHED_NUM_SAMPLES
    ok, why = comparability(True, _stats(source=ADM_BATCH), n)
    assert ok and "ADM reference batch" in why
    own = _stats(source=IMAGES, inception_sha256=STANDARD_WEIGHTS_SHA256)
    assert comparability(True, own, n)[0]
    assert comparability(True, _stats(source=PIXEL_DATA, inception_sha256=STANDARD_WEIGHTS_SHA256), n)[0]
    cases = {
        "not the standard pt_inception-2015-12-05": (False, _stats(source=ADM_BATCH), n),
        "VAE reconstructions": (True, _stats(source=VAE_RECONSTRUCTIONS, inception_sha256=STANDARD_WEIGHTS_SHA256),
                                n),
        "no provenance": (True, _stats(source=UNKNOWN), n),
        "not computed with the standard Inception weights": (True, _stats(source=IMAGES, inception_sha256="0" * 64),
                                                            n),
        "not computed with the standard": (True, _stats(source=ADM_BATCH, inception_sha256="1" * 64), n),
        "another pipeline": (True, _stats(source=IMAGES, inception_sha256=STANDARD_WEIGHTS_SHA256, pipeline="x"),
                             n),
        "5000 samples, published numbers use 50000": (True, _stats(source=ADM_BATCH), 5000),
    }
    for needle, args in cases.items():
        ok, why = comparability(*args)
        assert not ok and why.startswith("not comparable: ") and needle in why, (needle, why)


def test_latent_datasets_give_vae_reconstructions(monkeypatch):
    from types import SimpleNamespace

    import tread_scale.data.metadata as metadata
    from tread_scale.evaluation.fid import dataset_source

    monkeypatch.setattr(metadata, "read_metadata", lambda root: SimpleNamespace(vae=root))
    assert dataset_source("none") == PIXEL_DATA
    assert dataset_source("stabilityai/sd-vae-ft-ema") == VAE_RECONSTRUCTIONS


def test_kept_features_come_back_in_sample_order():
    from tread_scale.evaluation.fid import _interleave

    n, w = 11, 3
    parts = [torch.arange(n)[r::w].float()[:, None] for r in range(w)]
    assert torch.equal(_interleave(parts)[:, 0], torch.arange(n).float())
    with pytest.raises(ValueError, match="not a strided split"):
        _interleave([torch.zeros(3, 1), torch.zeros(1, 1)])


def test_state_dicts_without_batch_counters_load(inception_pth, tmp_path):
    """Ported weight files may lack BatchNorm's num_batches_tracked buffers (they are not weights)."""
    state = {k: v for k, v in torch.load(inception_pth, weights_only=True).items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "ported.pth")
    net = load_inception(tmp_path / "ported.pth")
    assert torch.equal(net.net.fc.weight, state["fc.weight"])
