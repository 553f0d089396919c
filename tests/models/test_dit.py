import math

import pytest
import torch

from tread_scale.models import DiT, model_names, parse_model_name
from tread_scale.models.embeddings import sincos_1d, sincos_2d
from tread_scale.errors import ConfigError


def tiny(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=5)
    args.update(kw)
    return DiT(**args)


def test_output_shape_and_null_label():
    net = tiny()
    x = torch.randn(3, 4, 8, 8)
    out = net(x, torch.rand(3), torch.tensor([0, 4, net.null_label]))
    assert out.shape == x.shape
    assert net.null_label == 5 and net.y_embedder.embedding_table.num_embeddings == 6


def test_blocks_read_a_token_major_residual_stream():
    """The patch embedding's transposed view must not set the layout of the whole residual stream."""
    net = tiny()
    strides = []
    for block in net.blocks:
        block.register_forward_pre_hook(lambda m, args: strides.append(args[0].is_contiguous()))
    net(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert strides == [True] * 4


@pytest.mark.parametrize("channels,size,patch", [(3, 16, 4), (8, 12, 2), (16, 8, 8)])
def test_any_channel_count_and_resolution(channels, size, patch):
    net = tiny(in_channels=channels, input_size=size, patch_size=patch)
    assert net.num_tokens == (size // patch) ** 2
    out = net(torch.randn(2, channels, size, size), torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == (2, channels, size, size)


def test_non_square_latents():
    net = tiny(input_size=(8, 16))
    assert net.grid == (4, 8)
    assert net(torch.randn(1, 4, 8, 16), torch.rand(1), torch.tensor([0])).shape == (1, 4, 8, 16)


def test_wrong_input_shape_names_expected_shape():
    net = tiny()
    with pytest.raises(ValueError, match=r"expects latents of shape \(B, 4, 8, 8\), got \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]))


def test_patch_must_divide_size():
    with pytest.raises(ValueError, match="does not divide"):
        tiny(input_size=10, patch_size=4)


@pytest.mark.parametrize("name,params_m", [("DiT-S/2", 33), ("DiT-B/2", 130), ("DiT-L/2", 458), ("DiT-XL/2", 675)])
def test_registry_sizes_match_paper_parameter_counts(name, params_m):
    size, patch = parse_model_name(name)
    with torch.device("meta"):
        net = DiT(input_size=32, patch_size=patch, hidden_size=size.hidden_size, depth=size.depth,
                  num_heads=size.num_heads)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / 1e6 - params_m) / params_m < 0.01, n


def test_registry_has_all_sizes_and_patches():
    assert len(model_names()) == 12 and "DiT-XL/8" in model_names()
    with pytest.raises(ConfigError, match=r"unknown model 'DiT-XXL/2'. Did you mean DiT-XL/2"):
        parse_model_name("DiT-XXL/2")


def test_pos_embed_is_mae_sincos_and_fixed():
    net = tiny()
    assert "pos_embed" in dict(net.named_buffers()) and "pos_embed" not in dict(net.named_parameters())
    table = sincos_2d(64, 4, 4)
    # token (row 1, col 2): first half encodes the column, second half the row
    k = torch.arange(16, dtype=torch.float64)
    omega = 1 / 10000 ** (k / 16)
    expected = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega), torch.sin(1 * omega), torch.cos(1 * omega)])
    assert torch.allclose(table[1 * 4 + 2].double(), expected, atol=1e-6)
    assert torch.equal(net.pos_embed[0], table)
    assert torch.allclose(sincos_1d(4, torch.tensor([0.0]))[0], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))


def test_timestep_sinusoid_is_cos_then_sin():
    net = tiny()
    emb = net.t_embedder.sinusoid(torch.tensor([0.5]))
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    assert torch.allclose(emb[0, :128], torch.cos(0.5 * freqs), atol=1e-6)
    assert torch.allclose(emb[0, 128:], torch.sin(0.5 * freqs), atol=1e-6)


def test_adaln_zero_init_outputs_zero_and_xavier_all_does_not():
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    zero = tiny(init="adaln_zero")
    assert torch.count_nonzero(zero.blocks[0].adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(zero.final_layer.linear.weight) == 0
    assert torch.equal(zero(x, t, y), torch.zeros_like(x))
    xav = tiny(init="xavier_all")
    assert torch.count_nonzero(xav.blocks[0].adaLN_modulation[-1].weight) > 0
    assert torch.count_nonzero(xav.final_layer.linear.weight) > 0
    assert xav.final_layer.linear.bias.abs().sum() == 0
    assert xav(x, t, y).abs().sum() > 0
    with pytest.raises(ValueError, match="init must be"):
        tiny(init="zeros")
