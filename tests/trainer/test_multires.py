"""Multi-resolution stages: a run at one latent size continues at a larger one through ``model.init_from``."""

import torch

from tests.conftest import tiny_run_cfg, write_npz_latents
from tread_scale.config import config_from_dict
from tread_scale.data.conversion.sources import NpyFolderSource
from tread_scale.data.conversion.writer import ConvertOptions, convert
from tread_scale.factory import build_net
from tread_scale.models.embeddings import sincos_2d
from tread_scale.sampling.loading import load_initial_weights, load_net
from tread_scale.trainer.builder import train
from tread_scale.weights import load_weights


def test_a_dit_trained_at_8x8_continues_at_16x16_with_its_own_positions(latent_dataset, tmp_path):
    low = config_from_dict(tiny_run_cfg(latent_dataset, tmp_path, run_name="low", train={"max_duration": "2ba"},
                                        sampling={"every": None, "at_fit_end": False}))
    first = train(low)
    weights, _ = load_weights(first.ema_weights)

    write_npz_latents(tmp_path / "src16", n=16, shape=(4, 16, 16))
    data16 = str(tmp_path / "mds16")
    convert(NpyFolderSource(folder=str(tmp_path / "src16"), num_classes=5), data16, ConvertOptions(progress=False))
    high_cfg = tiny_run_cfg(data16, tmp_path, run_name="high", train={"max_duration": "2ba"},
                            sampling={"every": None, "at_fit_end": False})
    high_cfg["model"] = {**high_cfg["model"], "input_size": 16, "init_from": str(first.ema_weights)}
    high = config_from_dict(high_cfg)

    # the stage's model starts from every trained weight; its positions are the 8x8 grid's, a function of the grid
    net = build_net(high.model, high.routes)
    load_initial_weights(net, str(first.ema_weights))
    assert torch.equal(net.pos_embed[0], sincos_2d(64, 8, 8))
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if k != "pos_embed")
    # and computes at 16x16 what the 8x8-configured model computes at 16x16
    low_net, _ = load_net(first.ema_weights, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.5, 1.5]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.allclose(net.eval()(x, t, y), low_net(x, t, y), atol=1e-6)

    second = train(high)
    assert second.batches == 2 and second.ema_weights.is_file()
    assert load_weights(second.ema_weights)[0]["pos_embed"].shape == (1, 64, 64)


def test_an_mmdit_continues_at_a_larger_grid_with_its_own_positions(tmp_path):
    """Weights of an MMDiT configured for 8x8 latents start a 16x16 stage (sin-cos table recomputed, RoPE and SD3's
    cropped table carried over); the stage's model computes what the 8x8 one computes at 16x16."""
    from tread_scale.models.conditioning import TextCondition
    from tread_scale.models.mmdit import MMDiT
    from tread_scale.weights import save_weights

    common = dict(patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, text_dim=16, pooled_dim=8,
                  text_len=4, init="xavier_all")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.2, 0.7])
    y = TextCondition(torch.randn(2, 4, 16, generator=g), torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 8))
    for pos, extra in (("sincos", {}), ("rope", {}), ("sd3", {"pos_embed_max_size": 16})):
        torch.manual_seed(0)
        low = MMDiT(input_size=8, pos_embed=pos, **extra, **common).eval()
        for p in low.parameters():
            p.data.add_(torch.randn_like(p) * 0.05)
        path = save_weights(tmp_path / f"{pos}.safetensors", low.state_dict(), {"source": "test"})
        high = MMDiT(input_size=16, pos_embed=pos, **extra, **common).eval()
        load_initial_weights(high, str(path))
        if pos == "sincos":
            assert torch.equal(high.pos_embed[0], sincos_2d(32, 8, 8))
        with torch.no_grad():
            assert torch.allclose(high(x, t, y), low(x, t, y), atol=1e-6), pos
