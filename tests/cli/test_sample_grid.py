"""``tread-scale sample``: the grid shows at most ``--grid-max`` samples, the ``.npz`` holds them all."""

import argparse
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tread_scale.cli import main
from tread_scale.config import ModelConfig, RoutingConfig, to_dict
from tread_scale.factory import build_dit
from tread_scale.sampling import grid_image
from tread_scale.weights import DataFacts, WeightsMeta, save_weights


@pytest.fixture
def weights(tmp_path):
    cfg = ModelConfig(name=None, depth=2, hidden_size=32, num_heads=2, patch_size=2, in_channels=3, input_size=8,
                      num_classes=6)
    torch.manual_seed(0)
    meta = WeightsMeta(model=to_dict(cfg), routing=to_dict(RoutingConfig()), objective={"kind": "rf"},
                       data=DataFacts(latent_shape=[3, 8, 8], num_classes=6), run_name="grid-test")
    return save_weights(tmp_path / "w.safetensors", build_dit(cfg).state_dict(), meta)


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _unscaled(png: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Undo save_png's nearest-neighbour upscaling (to a short side of at least 256)."""
    scale = max(1, math.ceil(256 / min(grid.shape[:2])))
    assert png.shape[:2] == (grid.shape[0] * scale, grid.shape[1] * scale)
    return png[::scale, ::scale]


def test_grid_is_capped_and_the_npz_keeps_every_sample(weights, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", str(weights), "--out", str(out), "--num", "40", "--grid-max", "12", "--steps", "1",
                 "--batch-size", "16", "--device", "cpu"]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (40, 8, 8, 3) and npz["latents"].shape == (40, 3, 8, 8)
    assert npz["labels"].tolist() == [i % 6 for i in range(40)] and npz["seeds"].tolist() == list(range(40))
    expected = grid_image(npz["images"][:12], columns=6)  # a column per class, two rows
    assert expected.shape == (2 * 10 + 2, 6 * 10 + 2, 3)
    assert np.array_equal(_unscaled(_png(out / "grid.png"), expected), expected)


def test_default_cap_is_64(weights, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", str(weights), "--out", str(out), "--num", "70", "--steps", "1", "--batch-size", "70",
                 "--device", "cpu"]) == 0
    images = np.load(out / "samples.npz")["images"]
    assert len(images) == 70
    expected = grid_image(images[:64], columns=6)  # 11 rows, not 12
    assert np.array_equal(_unscaled(_png(out / "grid.png"), expected), expected)


def test_grid_max_below_one_is_a_clear_error(weights, tmp_path, capsys):
    assert main(["sample", str(weights), "--out", str(tmp_path / "s"), "--grid-max", "0"]) == 2
    assert "--grid-max must be >= 1" in capsys.readouterr().err


def test_batch_size_above_num_computes_only_num_samples(weights, tmp_path, monkeypatch, caplog):
    """Issue 22.9: ``--num 3 --batch-size 8`` computed batches of 8 (5 of them padding), now batches of 3."""
    from tread_scale.cli.common import add_guidance_args, guidance_from_args
    from tread_scale.sampling import SamplerSettings, folder, generate

    sizes = []
    real_load = folder.load_net

    def load_and_count(path, dev):
        net, meta = real_load(path, dev)
        net.register_forward_hook(lambda module, args, out: sizes.append(out.shape[0]))
        return net, meta

    monkeypatch.setattr(folder, "load_net", load_and_count)
    out = tmp_path / "s"
    with caplog.at_level("INFO"):
        assert main(["sample", str(weights), "--out", str(out), "--num", "3", "--batch-size", "8", "--steps", "2",
                     "--device", "cpu"]) == 0
    assert sizes and set(sizes) == {3}, sizes
    assert "--batch-size 8 > --num 3: batches of 3" in caplog.text
    assert "padded" not in caplog.text
    npz = np.load(out / "samples.npz")
    # the same samples as the padded batch of 8 gave before (equal up to rounding: another batch shape)
    net, meta = real_load(weights, torch.device("cpu"))
    settings = SamplerSettings(meta.objective_kind, 2, sigma_data=meta.sigma_data, shift=meta.shift)
    parser = argparse.ArgumentParser()
    add_guidance_args(parser)
    caplog.clear()
    with caplog.at_level("INFO"):
        [(idx, lat, images, ys)] = generate(
            net, settings.objective, [0, 1, 2], seed=0, num_classes=6, steps=2,
            guidance=guidance_from_args(parser.parse_args([])), edm=settings.edm(), device=torch.device("cpu"),
            batch_size=8, labels=[0, 1, 2], shift=settings.shift)
    assert "the last batch of 8 computes 5 padded sample(s) and discards them" in caplog.text
    assert idx == [0, 1, 2] and npz["labels"].tolist() == ys
    np.testing.assert_allclose(npz["latents"], lat.numpy(), atol=1e-5)
    assert np.abs(npz["images"].astype(int) - images.astype(int)).max() <= 1


def test_batch_size_below_one_is_a_clear_error(weights, tmp_path, capsys):
    assert main(["sample", str(weights), "--out", str(tmp_path / "s"), "--batch-size", "0", "--steps", "1",
                 "--device", "cpu"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
