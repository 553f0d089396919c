"""Models run at any latent grid the patch divides (aspect-ratio buckets, multi-resolution training)."""

import pytest
import torch

from tread_scale.models import DiT, MMDiT, TextCondition
from tread_scale.models.embeddings import PatchEmbed, sincos_1d, sincos_2d
from tread_scale.models.flops import mmdit_flops, model_flops
from tread_scale.models.rope import rope_angles
from tread_scale.routing import Route, TokenRouter, num_kept, routed_block_flops, routed_flops_fraction

TEXT_DIM, POOLED_DIM = 8, 6


def dit(input_size=8, **kw):
    torch.manual_seed(0)
    args = dict(input_size=input_size, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                num_classes=5, init="xavier_all")
    return DiT(**{**args, **kw})


def mmdit(input_size=8, pos_embed="rope", **kw):
    torch.manual_seed(0)
    args = dict(input_size=input_size, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                text_dim=TEXT_DIM, pooled_dim=POOLED_DIM, pos_embed=pos_embed, init="xavier_all",
                pos_embed_max_size=8 if pos_embed == "sd3" else None)
    return MMDiT(**{**args, **kw})


def latent(h, w, b=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, h, w, generator=g), torch.rand(b, generator=g)


def text(b=2):
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[True, True, False], [True, False, False]])[:b]
    return TextCondition(torch.randn(b, 3, TEXT_DIM, generator=g), mask, torch.randn(b, POOLED_DIM, generator=g))


def same_weights(src, dst):
    """``dst`` with ``src``'s weights (a fixed sin-cos table of another grid is replaced by dst's own)."""
    dst.load_state_dict(src.state_dict())
    return dst


# ------------------------------------------------------------------ token order and positions


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (4, 6)])
def test_patch_tokens_sincos_rows_and_unpatchify_share_one_row_major_order(grid):
    gh, gw = grid
    p, c = 2, 3
    # a patch embedding that copies each patch's pixels into its token, in the (row, col, channel) order of
    # the final layer's outputs
    embed = PatchEmbed(c, p * p * c, p)
    with torch.no_grad():
        embed.proj.weight.zero_(), embed.proj.bias.zero_()
        for i in range(p):
            for j in range(p):
                for ch in range(c):
                    embed.proj.weight[(i * p + j) * c + ch, ch, i, j] = 1.0
    rows = torch.arange(gh * p).view(-1, 1).expand(-1, gw * p)
    cols = torch.arange(gw * p).view(1, -1).expand(gh * p, -1)
    x = torch.stack([rows, cols, rows * 100 + cols]).float()[None]  # (1, 3, H, W)
    tokens = embed(x)
    for k in range(gh * gw):
        # token k is the patch at row k // gw, column k % gw (its top-left pixel)
        assert tokens[0, k, :2].tolist() == [(k // gw) * p, (k % gw) * p]
    net = dit(input_size=(gh * p, gw * p), in_channels=c)
    assert torch.equal(net.unpatchify(tokens, grid), x)
    table = sincos_2d(32, gh, gw)
    for k in range(gh * gw):
        # the first half of the channels encodes the column, the second half the row
        expected = torch.cat([sincos_1d(16, torch.tensor([k % gw])), sincos_1d(16, torch.tensor([k // gw]))], 1)
        torch.testing.assert_close(table[k], expected[0].float())
    angles = rope_angles(8, gh, gw)
    omega = 10000.0 ** (-torch.arange(2, dtype=torch.float64) / 2)
    for k in range(gh * gw):
        torch.testing.assert_close(angles[k], torch.cat([(k // gw) * omega, (k % gw) * omega]).float())


# ------------------------------------------------------------------ DiT


@pytest.mark.parametrize("hw", [(8, 12), (12, 8)])
def test_dit_on_another_grid_equals_a_dit_built_for_it(hw):
    small, big = dit(8), dit(hw)
    same_weights(small, big)
    assert torch.equal(big.pos_embed[0], sincos_2d(32, hw[0] // 2, hw[1] // 2))
    x, t = latent(*hw)
    y = torch.tensor([0, 5])
    with torch.no_grad():
        out = small(x, t, y)
        assert out.shape == x.shape and torch.equal(out, big(x, t, y))
        assert torch.equal(small.sincos_positions((hw[0] // 2, hw[1] // 2)), big.pos_embed)
    assert small.input_size == (8, 8) and small.num_tokens == 16 and small.pos_embed.shape == (1, 16, 32)
    assert list(small.state_dict()) == list(dit(8).state_dict())  # no key for the computed tables


def test_a_fixed_table_of_another_grid_loads_and_a_wrong_width_does_not():
    small, big = dit(8), dit((8, 12))
    big.load_state_dict(small.state_dict())
    assert torch.equal(big.pos_embed[0], sincos_2d(32, 4, 6)) and torch.equal(small.pos_embed[0], sincos_2d(32, 4, 4))
    wide = dit(8, hidden_size=64)
    with pytest.raises(RuntimeError, match="size mismatch"):
        big.load_state_dict(wide.state_dict())


def test_input_checks_name_the_expected_shape():
    net = dit(8)
    t, y = torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"DiT expects latents of shape \(B, 4, 8, 12\), got \(2, 3, 8, 12\)"):
        net(torch.randn(2, 3, 8, 12), t, y)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\) with H and W multiples of the patch size 2 "
                                         r"\(configured: \(B, 4, 8, 8\)\), got \(2, 4, 8, 9\)"):
        net(torch.randn(2, 4, 8, 9), t, y)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        net(torch.randn(2, 4, 8), t, y)
    mm = mmdit(8)
    with pytest.raises(ValueError, match=r"MMDiT expects latents of shape \(B, 4, 6, 10\), got \(2, 5, 6, 10\)"):
        mm(torch.randn(2, 5, 6, 10), t, text())


def test_grid_helpers_and_flops_of_another_grid():
    net = dit(8)
    assert net.grid_of(8, 12) == (4, 6) and net.tokens_for((8, 12)) == 24 and net.tokens_for(12) == 36
    assert net.tokens_for() == net.routable_tokens == 16
    with pytest.raises(ValueError, match="does not divide the latent size 8x9"):
        net.tokens_for((8, 9))
    routes = [Route(0.5, 0, 1)]
    dense, routed = routed_block_flops(net, routes, num_tokens=24)
    assert dense == 2 * net.block_flops(24) and routed == 2 * net.block_flops(num_kept(24, 0.5))
    assert routed_block_flops(net, routes) == routed_block_flops(net, routes, num_tokens=16)
    assert routed_flops_fraction(net, routes, num_tokens=24) == routed / dense
    assert model_flops(net, routes, latent_hw=(8, 12)).dense == model_flops(dit((8, 12)), routes).dense
    mm = mmdit(8)
    assert mmdit_flops(mm, routes, latent_hw=(12, 8)).routed == model_flops(mmdit((12, 8)), routes).routed
    assert model_flops(mm, routes).dense == model_flops(mm, routes, latent_hw=(8, 8)).dense


# ------------------------------------------------------------------ MMDiT


@pytest.mark.parametrize("pos_embed", ["rope", "sincos", "sd3"])
@pytest.mark.parametrize("hw", [(8, 12), (12, 8)])
def test_mmdit_on_another_grid_equals_an_mmdit_built_for_it(pos_embed, hw):
    small, big = mmdit(8, pos_embed), mmdit(hw, pos_embed)
    same_weights(small, big)
    x, t = latent(*hw)
    with torch.no_grad():
        out = small(x, t, text())
        assert out.shape == x.shape and torch.equal(out, big(x, t, text()))


def test_mmdit_position_tables_of_another_grid():
    rope = mmdit(8, "rope")
    assert torch.equal(rope.rope_table(grid=(4, 6)), mmdit((8, 12), "rope").rope_table())
    assert rope.rope_table(grid=(4, 6)) is rope.rope_table(grid=(4, 6))  # cached
    assert "rope" not in "".join(rope.state_dict())
    sd3 = mmdit(8, "sd3")
    crop = sd3.cropped_pos_embed((4, 6)).reshape(4, 6, -1)
    assert torch.equal(crop, sd3.pos_embed.reshape(8, 8, -1)[2:6, 1:7])


def test_sd3_refuses_a_grid_larger_than_its_table():
    net = mmdit(8, "sd3")  # an 8x8 table of patches: latents up to 16 a side
    x, t = latent(8, 18)
    with pytest.raises(ValueError, match=r"pos_embed_max_size=8 .* patch grid 4x9 is larger"):
        net(x, t, text())
    assert net(*latent(16, 16), text()).shape == (2, 4, 16, 16)


def test_learned_positions_refuse_another_grid():
    net = mmdit(8, "learned")
    x, t = latent(8, 12)
    with pytest.raises(ValueError, match=r"pos_embed='learned' .* grid 4x4 \(latent 8x8\) only; "
                                         r"got the grid 4x6 \(latent 8x12\)"):
        net(x, t, text())
    assert net(*latent(8, 8), text()).shape == (2, 4, 8, 8)


# ------------------------------------------------------------------ routing


def kept_counts(net):
    counts = []
    for block in net.blocks:
        block.register_forward_pre_hook(lambda m, args: counts.append(args[0].shape[1]))
    return counts


@pytest.mark.parametrize("family", ["dit", "mmdit"])
def test_routed_forward_on_another_grid_equals_the_model_built_for_it(family):
    build = dit if family == "dit" else mmdit
    cond = torch.tensor([1, 2]) if family == "dit" else text()
    small, big = build(8), build((8, 12))
    same_weights(small, big)
    for net in (small, big):
        net.attach_router(TokenRouter([Route(0.5, 1, 1)], seed=4))
        net.train()
    counts = kept_counts(small)
    x, t = latent(8, 12)
    with torch.no_grad():
        out = small(x, t, cond, routing_seed=[5, 6])
        assert torch.equal(out, big(x, t, cond, routing_seed=[5, 6]))
        assert not torch.equal(out, small(x, t, cond, rate_override=0.0, routing_seed=[5, 6]))
    assert counts == [24, num_kept(24, 0.5), 24, 24]  # the routed call, then the call at rate 0


def test_rope_rows_travel_with_the_kept_tokens_of_the_forward_grid():
    net = mmdit(8, "rope")
    net.attach_router(TokenRouter([Route(0.5, 0, 0)], seed=1))
    net.train()
    seen = {}
    net.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(rope=args[3]))
    x, t = latent(12, 8)
    schedule_ids = net.router.schedule(2, 24, x.device, training=True, seed=[3, 4])[0][1]
    net(x, t, text(), routing_seed=[3, 4])
    full = net.rope_table(grid=(6, 4))[0]
    assert torch.equal(seen["rope"], torch.stack([full[ids] for ids in schedule_ids]))


# ------------------------------------------------------------------ caches


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_tables_built_under_inference_mode_do_not_break_training(pos_embed):
    net = mmdit(8, pos_embed)
    x, t = latent(8, 12)
    with torch.inference_mode():
        net(x, t, text())
    net.train()
    net(x, t, text()).square().mean().backward()
    assert net.x_embedder.proj.weight.grad is not None


def test_moving_or_casting_the_model_drops_cached_tables():
    net = dit(8)
    x, t = latent(8, 12)
    net(x, t, torch.tensor([0, 1]))
    assert len(net._grid_tables) == 1
    net.double()
    assert net._grid_tables == {} and net.sincos_positions((4, 6)).dtype == torch.float64
    net.float()
    assert net._grid_tables == {}
    net(x, t, torch.tensor([0, 1]))
    assert [table.dtype for table in net._grid_tables.values()] == [torch.float32]
