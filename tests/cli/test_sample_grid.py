"""``tread-scale sample``: the grid shows at most ``--grid-max`` samples, the ``.npz`` holds them all."""

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
