"""``fid_of_weights`` end to end against an ADM-style reference batch: ADM's metrics and the comparability label."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tread_scale.evaluation import inception as inception_mod
from tread_scale.evaluation import reference as reference_mod
from tread_scale.evaluation.inception import file_sha256
from tread_scale.evaluation.metrics import ADM_BATCH, ReferenceStats

from tests.conftest import tiny_run_cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pixel-space tiny model trained for 2 batches on the 8x8 demo data."""
    from tread_scale.cli import main

    root = tmp_path_factory.mktemp("fidw")
    data = root / "data"
    assert main(["convert", "demo", "--num-samples", "24", "--resolution", "8", "--out", str(data),
                 "--no-progress"]) == 0
    cfg = tiny_run_cfg(str(data), root / "runs", model={"in_channels": 3, "num_classes": 6},
                       train={"max_duration": "2ba"})
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "c.yaml")]) == 0
    return root


def _quick_distance(mu1, sigma1, mu2, sigma2):
    """A deterministic stand-in for the Fréchet distance: scipy's sqrtm of a 2048-d product takes minutes on a
    busy 2-core CPU, and its numerics are tested against pytorch-fid and torch-fidelity elsewhere."""
    return float(((mu1 - mu2) ** 2).sum() + abs(np.trace(sigma1) - np.trace(sigma2)))


@pytest.mark.slow
def test_adm_reference_batch_gives_adms_metrics_and_the_label(run, inception_pth, monkeypatch):
    import tread_scale.evaluation.fid as fid_mod
    from tread_scale.evaluation.fid import fid_of_weights

    monkeypatch.setattr(fid_mod, "frechet_distance", _quick_distance)

    rng = np.random.default_rng(0)
    batch = run / "VIRTUAL_tiny.npz"
    np.savez(batch, arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))  # images only, as some ADM batches
    common = dict(num=6, steps=2, batch_size=4, device="cpu", seed=5)
    weights = str(run / "runs" / "t")

    # standard weights and 6 samples counting as "published" here, to reach the comparable branch
    monkeypatch.setattr(inception_mod, "STANDARD_WEIGHTS_SHA256", file_sha256(inception_pth))
    monkeypatch.setattr(reference_mod, "PUBLISHED_NUM_SAMPLES", 6)
    saved = run / "stats.npz"
    r1 = fid_of_weights(weights, str(inception_pth), ref=str(batch), extra=True, save_ref=str(saved), **common)
    assert {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall", "num_samples",
            "comparable_to_published", "comparable_reason"} <= set(r1)
    assert r1["num_samples"] == 6 and np.isfinite(r1["fid"]) and 0 <= r1["precision"] <= 1
    assert r1["comparable_to_published"] is True and "ADM reference batch" in r1["comparable_reason"]
    stats = ReferenceStats.load(saved)  # statistics of the batch's images, with their provenance
    assert stats.source == ADM_BATCH and stats.num_images == 6 and stats.inception_sha256 == file_sha256(inception_pth)

    # the saved statistics give the same FID and sFID; with other weights the label says why not
    r2 = fid_of_weights(weights, str(inception_pth), ref=str(saved), **common)
    assert r2["fid"] == pytest.approx(r1["fid"], rel=1e-9) and r2["sfid"] == pytest.approx(r1["sfid"], rel=1e-9)
    assert r2["comparable_to_published"] is True and "inception_score" not in r2
    monkeypatch.setattr(inception_mod, "STANDARD_WEIGHTS_SHA256", "0" * 64)
    r3 = fid_of_weights(weights, str(inception_pth), ref=str(saved), **common)
    assert r3["fid"] == pytest.approx(r1["fid"], rel=1e-9)
    assert r3["comparable_to_published"] is False
    assert "Inception weights are not the standard" in r3["comparable_reason"]
