import pytest
import torch

from tread_scale.errors import ConfigError
from tread_scale.models import (
    MMDIT_SIZES, DiT, MMDiT, TextCondition, model_names, model_spec, parse_model_name,
)
from tread_scale.models.flops import mmdit_flops, model_flops
from tread_scale.models.rope import apply_rope, rope_angles, rope_table
from tread_scale.routing import Route, Routable, mmdit_block_flops

TEXT_DIM, POOLED_DIM = 24, 12


def tiny(**kw):
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                text_dim=TEXT_DIM, pooled_dim=POOLED_DIM, init="xavier_all")
    args.update(kw)
    torch.manual_seed(0)
    return MMDiT(**args)


def text(b=3, length=5, valid=(3, 5, 0), seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None, :] < torch.tensor(valid[:b])[:, None]
    return TextCondition(torch.randn(b, length, TEXT_DIM, generator=g), mask, torch.randn(b, POOLED_DIM, generator=g))


def inputs(b=3, channels=4, size=(8, 8)):
    g = torch.Generator().manual_seed(2)
    return torch.randn(b, channels, *size, generator=g), torch.rand(b, generator=g)


# ------------------------------------------------------------------ model


@pytest.mark.parametrize("pos_embed", ["sincos", "learned", "rope"])
def test_output_shape_and_finite_with_padding_and_an_empty_prompt(pos_embed):
    net = tiny(pos_embed=pos_embed)
    x, t = inputs()
    out = net(x, t, text())  # third prompt is all padding
    assert out.shape == x.shape and out.isfinite().all()


@pytest.mark.parametrize("channels,size,patch", [(3, (16, 16), 4), (16, (8, 12), 2), (4, (8, 8), 1)])
def test_any_channel_count_resolution_and_patch(channels, size, patch):
    net = tiny(in_channels=channels, input_size=size, patch_size=patch)
    assert net.grid == (size[0] // patch, size[1] // patch) and net.routable_tokens == net.num_tokens
    x, t = inputs(channels=channels, size=size)
    assert net(x, t, text()).shape == x.shape


def test_properties_mirror_the_dit():
    net = tiny()
    assert (net.depth, net.hidden_size, net.num_heads, net.mlp_ratio, net.patch_size, net.in_channels,
            net.out_channels, net.input_size, net.num_tokens) == (3, 32, 2, 4.0, 2, 4, 4, (8, 8), 16)
    assert isinstance(net, Routable) and isinstance(DiT(input_size=8, hidden_size=32, depth=2, num_heads=2,
                                                        num_classes=3), Routable)
    assert net.grad_checkpointing is False and net.router is None


def test_input_checks_name_the_expected_shapes():
    net = tiny()
    x, t = inputs()
    with pytest.raises(ValueError, match=r"expects latents of shape \(B, 4, 8, 8\), got \(3, 3, 8, 8\)"):
        net(torch.randn(3, 3, 8, 8), t, text())
    with pytest.raises(ValueError, match="text embeddings of width 24 and pooled embeddings of width 12"):
        net(x, t, TextCondition(torch.randn(3, 5, 7), torch.ones(3, 5, dtype=torch.bool), torch.randn(3, 12)))
    with pytest.raises(ValueError, match="batch 2 but the latents have batch 3"):
        net(x, t, text(b=2))
    with pytest.raises(TypeError, match="TextCondition"):
        net(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="pos_embed must be"):
        tiny(pos_embed="alibi")
    with pytest.raises(ValueError, match="divisible by 4"):
        tiny(hidden_size=36, num_heads=6)  # head dim 6
    with pytest.raises(ValueError, match="does not divide"):
        tiny(input_size=10, patch_size=4)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned", "rope"])
def test_padded_text_tokens_do_not_affect_the_output(pos_embed):
    net = tiny(pos_embed=pos_embed)
    x, t = inputs()
    cond = text()
    noisy = cond.emb.clone()
    noisy[~cond.mask] = 100 * torch.randn(int((~cond.mask).sum()), TEXT_DIM)
    assert torch.equal(net(x, t, cond), net(x, t, TextCondition(noisy, cond.mask, cond.pooled)))
    # and they do affect it where they are real tokens
    noisy[cond.mask] += 1
    assert not torch.allclose(net(x, t, cond), net(x, t, TextCondition(noisy, cond.mask, cond.pooled)))


def test_an_all_masked_prompt_contributes_only_its_pooled_embedding():
    net = tiny()
    x, t = inputs(b=2)
    pooled = torch.randn(2, POOLED_DIM)
    short = TextCondition(torch.randn(2, 1, TEXT_DIM), torch.zeros(2, 1, dtype=torch.bool), pooled)
    long = TextCondition(torch.randn(2, 7, TEXT_DIM), torch.zeros(2, 7, dtype=torch.bool), pooled)
    a, b = net(x, t, short), net(x, t, long)
    assert a.isfinite().all() and torch.allclose(a, b, atol=1e-6)


def test_last_block_has_no_text_output_and_text_length_is_free():
    net = tiny()
    assert [b.text_output for b in net.blocks] == [True, True, False]
    last = net.blocks[-1].txt
    assert last.kv_only and not hasattr(last, "mlp") and not hasattr(last, "qkv")
    assert last.adaLN_modulation[-1].out_features == 2 * 32
    x, t = inputs()
    assert net(x, t, text(length=11, valid=(11, 2, 0))).shape == x.shape


def test_depth_one_works():
    net = tiny(depth=1)
    x, t = inputs()
    assert net(x, t, text()).isfinite().all()


def test_adaln_zero_init_outputs_zero():
    net = tiny(init="adaln_zero")
    for block in net.blocks:
        for stream in (block.img, block.txt):
            assert torch.count_nonzero(stream.adaLN_modulation[-1].weight) == 0
    x, t = inputs()
    assert torch.equal(net(x, t, text()), torch.zeros_like(x))
    assert tiny(init="xavier_all")(x, t, text()).abs().sum() > 0


def test_qk_norm_is_optional():
    with_norm, without = tiny(qk_norm=True), tiny(qk_norm=False)
    assert isinstance(with_norm.blocks[0].img.q_norm, torch.nn.RMSNorm)
    assert isinstance(without.blocks[0].img.k_norm, torch.nn.Identity)
    x, t = inputs()
    assert without(x, t, text()).isfinite().all()


def test_position_embedding_kinds():
    assert "pos_embed" in dict(tiny(pos_embed="sincos").named_buffers())
    assert "pos_embed" in dict(tiny(pos_embed="learned").named_parameters())
    rope = tiny(pos_embed="rope")
    assert rope.pos_embed is None and rope.rope_table().shape == (1, 16, 16)
    assert tiny(pos_embed="sincos").rope_table() is None


def test_grad_checkpointing_gives_the_same_gradients():
    plain, ckpt = tiny(), tiny()
    ckpt.grad_checkpointing = True
    plain.train(), ckpt.train()
    x, t = inputs()
    lp, lc = plain(x, t, text()).square().mean(), ckpt(x, t, text()).square().mean()
    lp.backward(), lc.backward()
    assert torch.equal(lp, lc)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_blocks_compile_one_by_one():
    net = tiny()
    x, t = inputs()
    cond = text()
    expected = net(x, t, cond)
    for block in net.blocks:
        block.compile(backend="eager")
    torch.testing.assert_close(net(x, t, cond), expected)


def test_fsdp_wrap_units():
    net = tiny()
    units = [n for n, m in net.named_modules() if net.fsdp_wrap_fn(m)]
    assert units == ["x_embedder", "t_embedder", "pooled_embedder", "context_embedder", "blocks.0", "blocks.1",
                     "blocks.2", "final_layer"]


# ------------------------------------------------------------------ rope


def test_rope_is_a_rotation_by_relative_position():
    head_dim = 16
    table = rope_table(rope_angles(head_dim, 4, 4)).unsqueeze(0)  # (1, 16, 16)
    q, k = torch.randn(1, 1, 1, head_dim).expand(1, 1, 16, head_dim), torch.randn(1, 1, 1, head_dim).expand(1, 1, 16, head_dim)
    rq, rk = apply_rope(q, table), apply_rope(k, table)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rq[..., 0, :], q[..., 0, :])  # position (0, 0) is not rotated
    dots = (rq[0, 0][:, None] * rk[0, 0][None]).sum(-1)  # (16, 16): query token i, key token j
    # the score depends only on (row_i - row_j, col_i - col_j): (0,0)->(1,2) equals (2,1)->(3,3)
    torch.testing.assert_close(dots[0 * 4 + 0, 1 * 4 + 2], dots[2 * 4 + 1, 3 * 4 + 3])
    assert not torch.allclose(dots[0, 1 * 4 + 2], dots[0, 2 * 4 + 1])
    # rows rotate the first half of the pairs, columns the second
    angles = rope_angles(head_dim, 4, 4)
    assert torch.equal(angles[1 * 4 + 0, 4:], torch.zeros(4)) and torch.equal(angles[0 * 4 + 1, :4], torch.zeros(4))


# ------------------------------------------------------------------ flops


def test_mmdit_block_flops_formula():
    lt, k, d = 77, 256, 64
    assert mmdit_block_flops(lt, k, d) == 24 * (lt + k) * d * d + 24 * d * d + 4 * (lt + k) ** 2 * d
    assert mmdit_block_flops(lt, k, d, text_output=False) == (24 * k * d * d + 12 * d * d + 4 * lt * d * d
                                                              + 4 * d * d + 4 * k * (lt + k) * d)


def test_model_flops_route_only_image_tokens():
    net = tiny(input_size=32, text_len=64)
    dense = model_flops(net, [])
    assert dense.dense == dense.routed and dense == mmdit_flops(net, [])
    routed = model_flops(net, [Route(0.5, 0, 1)])
    assert routed.other == dense.other
    expected = (net.block_flops(128, 0) + net.block_flops(128, 1) + net.block_flops(256, 2))
    assert routed.blocks_routed == expected and routed.blocks_routed < dense.blocks_dense
    # text tokens stay in every block: 64 of them join the 128 kept image tokens
    assert net.block_flops(128, 0) == mmdit_block_flops(64, 128, 32) > mmdit_block_flops(0, 128, 32)
    assert mmdit_flops(net, [], text_len=0).blocks_dense < dense.blocks_dense


# ------------------------------------------------------------------ registry


MMDIT_PARAMS = {  # text_dim 4096, pooled_dim 2048, 4 latent channels, RoPE, QK-norm
    "MMDiT-T/2": 968_256,
    "MMDiT-B/2": 254_122_704,
    "MMDiT-L/2": 902_810_576,
    "MMDiT-2B/2": 2_025_825_744,
    "MMDiT-8B/2": 8_050_476_880,
}


@pytest.mark.parametrize("name", list(MMDIT_PARAMS))
def test_registry_parameter_counts_on_the_meta_device(name):
    spec = model_spec(name)
    assert spec.family == "mmdit" and spec.patch_size == 2
    size = spec.size
    with torch.device("meta"):
        net = MMDiT(input_size=32, patch_size=spec.patch_size, hidden_size=size.hidden_size, depth=size.depth,
                    num_heads=size.num_heads)
    assert all(p.is_meta for p in net.parameters())
    assert sum(p.numel() for p in net.parameters()) == MMDIT_PARAMS[name]


def test_registry_shapes_and_parsers():
    assert MMDIT_SIZES["2B"].hidden_size == 64 * MMDIT_SIZES["2B"].num_heads == 1536
    assert MMDIT_SIZES["8B"].depth == 38 and MMDIT_SIZES["8B"].hidden_size == 64 * 38
    assert len(model_names()) == 12 and len(model_names("mmdit")) == 20
    assert len(model_names(None)) == 32 and "MMDiT-8B/1" in model_names(None)
    dit = model_spec("DiT-XL/2")
    assert dit.family == "dit" and (dit.size, dit.patch_size) == parse_model_name("DiT-XL/2")
    with pytest.raises(ConfigError, match="is an MMDiT, not a DiT"):
        parse_model_name("MMDiT-B/2")
    with pytest.raises(ConfigError, match=r"unknown model 'MMDiT-B/3'. Did you mean MMDiT-B/"):
        model_spec("MMDiT-B/3")


# ------------------------------------------------------------------ TextCondition


def test_text_condition_validates_shapes():
    with pytest.raises(ValueError, match="mask must be bool"):
        TextCondition(torch.zeros(2, 3, 4), torch.ones(2, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="shapes disagree"):
        TextCondition(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="needs emb"):
        TextCondition(torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 5))


def test_text_condition_from_batch_to_select_cat():
    batch = {"text_emb": torch.randn(4, 5, 6, dtype=torch.float16), "text_mask": torch.tensor([[1] * 5] * 4),
             "text_pooled": torch.randn(4, 3), "latent": None}
    cond = TextCondition.from_batch(batch)
    assert len(cond) == 4 and cond.mask.dtype == torch.bool and cond.text_len == 5
    half = cond.to(dtype=torch.float32)
    assert half.emb.dtype == torch.float32 and half.pooled.dtype == torch.float32 and half.mask.dtype == torch.bool
    assert len(cond.select(2)) == 1 and torch.equal(cond.select(-1).emb[0], cond.emb[3])
    picked = cond.select(torch.tensor([True, False, True, False]))
    assert torch.equal(picked.pooled, cond.pooled[[0, 2]])
    assert len(cond.select(slice(1, 3))) == 2
    both = TextCondition.cat([cond, cond.select(0)])
    assert len(both) == 5 and torch.equal(both.emb[4], cond.emb[0])
    with pytest.raises(KeyError, match="missing text_pooled"):
        TextCondition.from_batch({"text_emb": batch["text_emb"], "text_mask": batch["text_mask"]})


def test_text_condition_where_and_expand_for_caption_dropout():
    cond = text(b=3, length=5, valid=(3, 5, 2))
    empty = TextCondition(torch.full((1, 2, TEXT_DIM), 7.0), torch.tensor([[True, False]]), torch.full((1, POOLED_DIM), 9.0))
    out = cond.where(torch.tensor([False, True, False]), empty)
    assert out.text_len == 5  # the empty prompt is padded to the batch's length
    assert torch.equal(out.emb[0], cond.emb[0]) and torch.equal(out.pooled[2], cond.pooled[2])
    assert torch.equal(out.emb[1, :2], torch.full((2, TEXT_DIM), 7.0)) and torch.equal(out.emb[1, 2:], torch.zeros(3, TEXT_DIM))
    assert out.mask[1].tolist() == [True, False, False, False, False]
    assert torch.equal(out.pooled[1], torch.full((POOLED_DIM,), 9.0))
    many = empty.expand(4)
    assert len(many) == 4 and torch.equal(many.emb[3], empty.emb[0])
    with pytest.raises(ValueError, match="batch-1"):
        cond.expand(2)
    with pytest.raises(ValueError, match="drop must have shape"):
        cond.where(torch.tensor([True]), empty)
    # the diffusion objectives' condition dropout and null branch work on it
    from tread_scale.diffusion.conditioning import drop_condition, null_like

    assert torch.equal(drop_condition(cond, torch.tensor([True, True, True]), empty).pooled,
                       torch.full((3, POOLED_DIM), 9.0))
    assert len(null_like(cond, empty)) == 3


def test_text_condition_pad_to_refuses_to_drop_real_tokens():
    cond = text(b=2, length=5, valid=(3, 2))
    assert cond.pad_to(3).text_len == 3 and cond.pad_to(8).mask[:, 5:].any().item() is False
    with pytest.raises(ValueError, match="real tokens would be dropped"):
        cond.pad_to(2)


def test_null_condition_is_stored_with_the_weights():
    net = tiny()
    null = net.null_label
    assert len(null) == 1 and not null.mask.any() and torch.equal(null.pooled, torch.zeros(1, POOLED_DIM))
    x, t = inputs()
    assert net(x, t, null.expand(3)).isfinite().all()
    from tread_scale.diffusion.conditioning import drop_condition

    dropped = drop_condition(text(), torch.tensor([True, False, False]), net.null_label)
    assert not dropped.mask[0].any() and torch.equal(dropped.emb[1], text().emb[1])
    empty = text(b=1, length=4, valid=(1,), seed=9)
    net.set_null_condition(empty)
    assert torch.equal(net.null_condition.emb, empty.emb) and net.null_condition.mask.tolist() == [[True, False, False, False]]
    other = tiny()
    other.load_state_dict(net.state_dict())  # the stored null's text length (4) replaces the default (1)
    assert torch.equal(other.null_condition.emb, empty.emb) and torch.equal(other(x, t, text()), net(x, t, text()))
    with pytest.raises(ValueError, match="batch of one"):
        net.set_null_condition(text(b=2))
