"""In-training FID and validation loss, and the plot of runs."""

import json

import numpy as np
import pytest
import torch

from tread_scale.config import config_from_dict
from tread_scale.evaluation.inception import FIDInception, save_inception
from tread_scale.evaluation.metrics import ReferenceStats
from tread_scale.plot import plot_runs
from tread_scale.trainer.builder import build_trainer, train
from tread_scale.trainer.callbacks.evaluation import ValidationLoss

from tests.conftest import tiny_run_cfg


@pytest.mark.slow
def test_fid_and_validation_loss_during_training_and_plot(latent_dataset, tmp_path):
    torch.manual_seed(0)
    inception = save_inception(FIDInception().eval(), tmp_path / "inception.safetensors")
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((64, 2048))
    ReferenceStats(feats.mean(0), np.cov(feats, rowvar=False)).save(tmp_path / "ref.npz")
    ev = {"fid_every": "2ba", "fid_num_samples": 4, "fid_steps": 2, "fid_batch_size": 2, "inception": str(inception),
          "reference": str(tmp_path / "ref.npz"), "val_every": "2ba", "val_num_samples": 8}
    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path / "tread", evaluation=ev,
                                        logging={"metrics_interval": 1}))
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "tread" / "t" / "eval.jsonl").read_text().splitlines()]
    fids = [r for r in records if "fid" in r]
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in fids] == [2, 4] and all(np.isfinite(r["fid"]) and r["fid"] > 0 for r in fids)
    # a random Inception and statistics without provenance: labelled, with the reasons
    assert all(r["comparable_to_published"] is False for r in fids)
    assert "not the standard pt_inception-2015-12-05" in fids[0]["comparable_reason"]
    assert "no provenance" in fids[0]["comparable_reason"] and "4 samples" in fids[0]["comparable_reason"]
    assert [r["step"] for r in vals] == [2, 4] and set(vals[0]["val_loss_by_level"]) == {"0.1", "0.5", "1.0", "2.0"}

    dense = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path / "dense", routing={"routes": []},
                                          logging={"metrics_interval": 1}))
    train(dense)
    png = plot_runs([tmp_path / "tread" / "t", tmp_path / "dense" / "t"], tmp_path / "curves.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 800 and im.size[1] > 500


def test_validation_loss_is_deterministic(latent_dataset, tmp_path):
    cfg = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, train={"max_duration": "1ba"},
                                        evaluation={"val_every": "1ba", "val_num_samples": 8}))
    trainer, _ = build_trainer(cfg)
    trainer.fit()
    cb = next(c for c in trainer.state.callbacks if isinstance(c, ValidationLoss))
    a = cb.evaluate(trainer.state, trainer.logger)
    b = cb.evaluate(trainer.state, trainer.logger)
    trainer.close()
    assert a == b and np.isfinite(a)


def test_fid_config_needs_its_files(tmp_path):
    import pytest

    from tread_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="evaluation.fid_every is set, so evaluation.inception must name a local file"):
        config_from_dict(tiny_run_cfg("/d", tmp_path, evaluation={"fid_every": "10ba"}))
    with pytest.raises(ConfigError, match="evaluation.reference: '/nope.npz' does not exist"):
        config_from_dict(tiny_run_cfg("/d", tmp_path, evaluation={"fid_every": "10ba", "inception": __file__,
                                                                  "reference": "/nope.npz"}))


def test_fid_monitor_needs_stored_reference_statistics(tmp_path):
    from tread_scale.errors import ConfigError
    from tread_scale.trainer.callbacks.evaluation import FIDMonitor

    np.savez(tmp_path / "VIRTUAL_images_only.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ConfigError, match="VIRTUAL_images_only.npz is an ADM reference batch without stored"):
        FIDMonitor(lambda: None, None, "inception.pth", str(tmp_path / "VIRTUAL_images_only.npz"), "1ba", 4,
                   sampler=None, num_classes=1, decode=None, eval_file=tmp_path / "eval.jsonl")
