"""``sample --size WxH``: weights trained at one size sample at an aspect-ratio bucket's size."""

import numpy as np
import pytest
import torch

from tread_scale.cli import main
from tread_scale.config import ModelConfig, to_dict
from tread_scale.diffusion.edm import EDM
from tread_scale.errors import ConfigError
from tread_scale.factory import build_dit
from tread_scale.models.dit import DiT
from tread_scale.routing import Route
from tread_scale.routing.router import TokenRouter
from tread_scale.sampling import sample_to_folder
from tread_scale.sampling.generate import generate, latent_size_of
from tread_scale.weights import save_weights

CFG = dict(name=None, depth=2, hidden_size=32, num_heads=4, patch_size=2, in_channels=3, input_size=8, num_classes=3,
           init="xavier_all")
ROUTES = [Route(0.5, 0, 1)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Pixel-space DiT weights configured for 3x8x8, with a route."""
    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    net = build_dit(cfg, ROUTES)
    for p in net.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    meta = {"model": to_dict(cfg), "routing": {"routes": [{"rate": 0.5, "start": 0, "end": 1}]},
            "objective": {"kind": "edm", "sigma_data": 0.5},
            "data": {"latent_shape": [3, 8, 8], "num_classes": 3, "vae": "none"}}
    return net.state_dict(), save_weights(tmp_path_factory.mktemp("w") / "ema.safetensors", net.state_dict(), meta)


def _built_for(hw, state):
    """A DiT configured for latent ``hw`` carrying the trained weights (its own position table)."""
    net = DiT(input_size=hw, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=3,
              init="xavier_all")
    net.attach_router(TokenRouter(ROUTES))
    net.load_state_dict(state)
    return net.eval()


def test_samples_at_two_bucket_sizes_equal_a_model_built_for_each(weights, tmp_path):
    state, path = weights
    for size, hw in (("12x8", (8, 12)), ("8x12", (12, 8))):
        out = sample_to_folder(str(path), str(tmp_path / size), num=3, steps=2, device="cpu", size=size,
                               labels=[0, 1, 2])
        with np.load(out["npz"]) as z:
            latents, images = z["latents"], z["images"]
        assert latents.shape == (3, 3, *hw) and images.shape == (3, *hw, 3)
        ref = _built_for(hw, state)
        assert ref.pos_embed.shape[1] == (hw[0] // 2) * (hw[1] // 2)
        (_, expected, _, _), = generate(ref, "edm", [0, 1, 2], seed=0, num_classes=3, steps=2, guidance=None,
                                        edm=EDM(sigma_data=0.5), device=torch.device("cpu"), batch_size=3,
                                        labels=[0, 1, 2])
        assert np.allclose(latents, expected.numpy(), atol=1e-5), np.abs(latents - expected.numpy()).max()


def test_the_cli_takes_size_and_names_bad_ones(weights, tmp_path, capsys):
    _, path = weights
    assert main(["sample", str(path), "--out", str(tmp_path / "s"), "--num", "2", "--steps", "2", "--device", "cpu",
                 "--size", "16x8"]) == 0
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["latents"].shape == (2, 3, 8, 16)
    net = _built_for((8, 8), weights[0])
    with pytest.raises(ConfigError, match="--size 13x8: width and height must be multiples of 2"):
        latent_size_of("13x8", net, pixel_space=True)
    with pytest.raises(ConfigError, match="--size 12x8: width and height must be multiples of 16"):
        latent_size_of("12x8", net, pixel_space=False)
    with pytest.raises(ConfigError, match="expected WIDTHxHEIGHT"):
        latent_size_of("wide", net, pixel_space=True)
    assert latent_size_of("256x128", net, pixel_space=False) == (16, 32)


def test_several_sizes_give_a_folder_each_and_one_grid_with_a_row_per_size(weights, tmp_path, capsys):
    from PIL import Image

    _, path = weights
    assert main(["sample", str(path), "--out", str(tmp_path / "m"), "--num", "3", "--steps", "2", "--device", "cpu",
                 "--size", "16x8", "--size", "8x16", "--size", "8x8"]) == 0
    for size, hw in (("16x8", (8, 16)), ("8x16", (16, 8)), ("8x8", (8, 8))):
        with np.load(tmp_path / "m" / size / "samples.npz") as z:
            assert z["images"].shape == (3, *hw, 3)
    with Image.open(tmp_path / "m" / "grid.png") as grid:
        cells_w, cells_h = 3 * (16 + 2) + 2, 3 * (16 + 2) + 2  # 3 columns, 3 rows of 16x16 cells, 2 px apart
        assert grid.size[0] * cells_h == grid.size[1] * cells_w  # upscaled as a whole (save_png's minimum side)
    capsys.readouterr()
    assert main(["sample", str(path), "--out", str(tmp_path / "x"), "--sweep", "cfg=1", "--size", "8x8",
                 "--size", "16x8"]) == 2
    assert "--sweep samples one size; give at most one --size" in capsys.readouterr().err
