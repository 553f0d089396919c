"""TREAD on the MMDiT: image tokens (with their positions) are routed, text tokens never are."""

import pytest
import torch
from composer.core import Event
from torch import nn

from tread_scale.models import DiT, MMDiT, TextCondition
from tread_scale.routing import (
                                 Routable, Route, TokenRouter, gather_tokens, num_kept, resolve_routes, routed_block_fraction,
                                 routed_flops_fraction, scatter_tokens,
                                 )
from tread_scale.trainer.tread_algorithm import TREADRouting

from tests.helpers_composer import FakeLogger, FakeState

TEXT_DIM, POOLED_DIM, LENGTH = 24, 12, 5
POS = ["sincos", "learned", "rope"]


def tiny(routes=(), seed=0, pos_embed="rope", depth=4, input_size=8):
    torch.manual_seed(0)
    net = MMDiT(input_size=input_size, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2,
                text_dim=TEXT_DIM, pooled_dim=POOLED_DIM, pos_embed=pos_embed, init="xavier_all")
    if routes:
        net.attach_router(TokenRouter(routes, seed=seed))
    return net


def batch(b=3, size=8):
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(LENGTH)[None, :] < torch.tensor([3, 5, 0][:b])[:, None]  # the third prompt is empty
    cond = TextCondition(torch.randn(b, LENGTH, TEXT_DIM, generator=g), mask, torch.randn(b, POOLED_DIM, generator=g))
    return torch.randn(b, 4, size, size, generator=g), torch.rand(b, generator=g), cond


class FixedSubsets(TokenRouter):
    """A router that hands out given kept indices (one tensor per route) instead of drawing them."""

    def __init__(self, routes, ids):
        super().__init__(routes)
        self.ids = ids

    def schedule(self, batch, num_tokens, device, *, training, force=False, **_):
        return {r.start: (r.end, ids) for r, ids in zip(self.resolved, self.ids)} if training or force else {}


@pytest.mark.parametrize("pos_embed", POS)
def test_rate_zero_is_bitwise_dense(pos_embed):
    dense, routed = tiny(pos_embed=pos_embed), tiny([Route(0.0, 1, 2)], pos_embed=pos_embed)
    routed.load_state_dict(dense.state_dict())
    dense.train(), routed.train()
    x, t, cond = batch()
    assert torch.equal(dense(x, t, cond), routed(x, t, cond))


def test_kept_count_and_text_tokens_are_never_routed():
    net = tiny([Route(0.75, 1, 2)])
    net.train()
    seen = []
    for i, block in enumerate(net.blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: seen.append((i, args[0].shape[1], args[1].shape[1],
                                                                           args[3].shape[1])))
    x, t, cond = batch()
    net(x, t, cond)
    kept = num_kept(16, 0.75)
    # (block, image tokens, text tokens, rope rows): text keeps all L tokens, positions follow the images
    assert seen == [(0, 16, LENGTH, 16), (1, kept, LENGTH, kept), (2, kept, LENGTH, kept), (3, 16, LENGTH, 16)]


def test_skipped_image_tokens_leave_the_route_unchanged():
    net = tiny([Route(0.5, 1, 2)])
    net.train()
    seen = {}
    net.blocks[0].register_forward_hook(lambda m, args, out: seen.__setitem__("before", out[0]))
    net.blocks[3].register_forward_pre_hook(lambda m, args: seen.__setitem__("after", args[0]))
    x, t, cond = batch()
    net(x, t, cond)
    before, after = seen["before"], seen["after"]
    changed = (before != after).any(-1)
    assert changed.sum(1).tolist() == [8, 8, 8]
    for b in range(3):
        assert torch.equal(before[b, ~changed[b]], after[b, ~changed[b]])


def test_routing_is_off_in_eval_unless_forced():
    dense, routed = tiny(), tiny([Route(0.5, 1, 2)])
    routed.load_state_dict(dense.state_dict())
    dense.eval(), routed.eval()
    x, t, cond = batch()
    assert torch.equal(dense(x, t, cond), routed(x, t, cond)) and routed.router.calls == 0
    forced = routed(x, t, cond, force_routing=True)
    assert forced.isfinite().all() and not torch.allclose(forced, dense(x, t, cond))
    assert routed(x, t, cond, force_routing=True, rate_override=0.0).equal(dense(x, t, cond))


@pytest.mark.parametrize("pos_embed", POS)
def test_gradients_reach_every_parameter(pos_embed):
    net = tiny([Route(0.5, 1, 2)], pos_embed=pos_embed)
    net.train()
    x, t, cond = batch()
    net(x, t, cond).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_seeded_routes_reproduce():
    a, b = tiny([Route(0.5, 1, 2)], seed=7), tiny([Route(0.5, 1, 2)], seed=7)
    a.train(), b.train()
    x, t, cond = batch()
    assert torch.equal(a(x, t, cond), b(x, t, cond))
    assert not torch.equal(a(x, t, cond), a(x, t, cond))  # the stream advances per call
    seeds = [11, 12, 13]
    first = a(x, t, cond, routing_seed=seeds)
    assert torch.equal(first, b(x, t, cond, routing_seed=seeds))
    # per-sample seeds: a sample's route does not depend on its batch
    alone = a(x[1:2], t[1:2], cond.select(1), routing_seed=[12])
    torch.testing.assert_close(alone[0], first[1], atol=1e-6, rtol=1e-5)


def test_activation_checkpointing_sees_the_same_subset():
    plain, ckpt = tiny([Route(0.5, 1, 2)], seed=3), tiny([Route(0.5, 1, 2)], seed=3)
    ckpt.grad_checkpointing = True
    plain.train(), ckpt.train()
    x, t, cond = batch()
    lp, lc = plain(x, t, cond).square().mean(), ckpt(x, t, cond).square().mean()
    lp.backward(), lc.backward()
    assert torch.equal(lp, lc)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def masked_dense_reference(net, x, t, cond, route, ids):
    """The routed forward computed without gathering: every image token stays in place with its own position;
    in the routed blocks the skipped image tokens are masked out as attention keys and their updates dropped."""
    img, txt, c = net.embed(x, t, cond)
    rope = net.rope_table()
    b, n, _ = img.shape
    keep = torch.zeros(b, n, dtype=torch.bool).scatter(1, ids, True)
    dense_mask = net.joint_mask(cond.mask, n)
    routed_mask = torch.cat([cond.mask, keep], dim=1)[:, None, None, :]
    for i, block in enumerate(net.blocks):
        inside = route.start <= i <= route.end
        new_img, txt = block(img, txt, c, rope, routed_mask if inside else dense_mask)
        img = torch.where(keep[..., None], new_img, img) if inside else new_img
    return net.unpatchify(net.final_layer(img, c))


@pytest.mark.parametrize("pos_embed", POS)
def test_kept_tokens_see_exactly_text_and_kept_images_at_their_own_positions(pos_embed):
    """Gathered sparse computation == dense computation with skipped keys masked (positions never reindexed)."""
    route = resolve_routes([Route(0.5, 1, 2)], 4)[0]
    g = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(16, generator=g)[:8].sort().values for _ in range(3)])
    net = tiny(pos_embed=pos_embed)
    net.attach_router(FixedSubsets([Route(0.5, 1, 2)], [ids]))
    net.train()
    x, t, cond = batch()
    with torch.no_grad():
        routed = net(x, t, cond)
        reference = masked_dense_reference(net, x, t, cond, route, ids)
    torch.testing.assert_close(routed, reference, atol=2e-5, rtol=1e-5)
    if pos_embed == "rope":  # the check is sensitive to positions: forgetting to gather the RoPE rows fails it
        wrong = net.rope_table
        net.rope_table = lambda device=None, grid=None: wrong(device, grid)[:, torch.arange(16).roll(3)]
        with torch.no_grad():
            assert not torch.allclose(net(x, t, cond), reference, atol=1e-3)


def quadrant_ids(b, rows, cols, side=4):
    return torch.tensor([[r * side + c for r in rows for c in cols]] * b)


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_a_route_over_every_block_equals_a_model_run_on_the_kept_patches_alone(pos_embed):
    """Keep the top-left 2x2 patches of a 4x4 grid through all blocks: their outputs must equal a dense
    forward of the same weights on the 4x4 latent crop (a 2x2 grid, whose positions are the same rows/cols)."""
    big = tiny(pos_embed=pos_embed, input_size=8)
    small = tiny(pos_embed=pos_embed, input_size=4)
    small.load_state_dict({k: v for k, v in big.state_dict().items() if k != "pos_embed"}, strict=False)
    x, t, cond = batch()
    ids = quadrant_ids(3, rows=(0, 1), cols=(0, 1))
    big.attach_router(FixedSubsets([Route(0.75, 0, -1)], [ids]))
    big.eval(), small.eval()
    with torch.no_grad():
        routed = big(x, t, cond, force_routing=True)
        alone = small(x[:, :, :4, :4], t, cond)
    torch.testing.assert_close(routed[:, :, :4, :4], alone, atol=2e-5, rtol=1e-5)
    # the other patches skipped every block: they come out of the final layer straight from the embedding
    # and differ from a dense pass
    dense = big(x, t, cond)
    assert not torch.allclose(routed[:, :, 4:, 4:], dense[:, :, 4:, 4:], atol=1e-3)
    # positions matter: the bottom-right quadrant is not the crop model's top-left one
    big.router.ids = [quadrant_ids(3, rows=(2, 3), cols=(2, 3))]
    with torch.no_grad():
        shifted = big(x, t, cond, force_routing=True)
        crop = small(x[:, :, 4:, 4:], t, cond)
    assert not torch.allclose(shifted[:, :, 4:, 4:], crop, atol=1e-3)


def test_empty_prompt_under_routing_is_finite():
    net = tiny([Route(0.75, 0, -1)])
    net.train()
    x, t, cond = batch()
    empty = TextCondition(cond.emb, torch.zeros_like(cond.mask), cond.pooled)
    assert net(x, t, empty).isfinite().all()


# ------------------------------------------------------------------ the protocol and TREADRouting


class ThirdFamily(nn.Module):
    """A model of another family implementing only the Routable protocol (an MLP-mixer-like stack)."""

    def __init__(self, tokens=12, width=8, depth=5):
        super().__init__()
        self.blocks_ = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.tokens = tokens
        self.router = None

    @property
    def depth(self):
        return len(self.blocks_)

    @property
    def routable_tokens(self):
        return self.tokens

    def attach_router(self, router):
        if self.router is not None:
            raise RuntimeError("already has a TREAD router")
        router.check_depth(self.depth)
        self.router = router

    def block_flops(self, tokens, index):
        return 2.0 * tokens * 8 * 8

    def forward(self, x):
        plan = self.router.schedule(x.shape[0], self.tokens, x.device, training=self.training) if self.router else {}
        end = -1
        for i, layer in enumerate(self.blocks_):
            if i in plan:
                end, ids = plan[i]
                saved, x = x, gather_tokens(x, ids)
            x = x + layer(x)
            if i == end:
                x = scatter_tokens(saved, ids, x)
        return x


class Wrapper(nn.Module):  # stands for the ComposerModel that holds the network as `.net`
    def __init__(self, net):
        super().__init__()
        self.net = net


@pytest.mark.parametrize("family", ["dit", "mmdit", "third"])
def test_tread_routing_applies_to_any_routable_family(family):
    net = {"dit": lambda: DiT(input_size=8, hidden_size=32, depth=4, num_heads=2, num_classes=3),
           "mmdit": tiny, "third": ThirdFamily}[family]()
    assert isinstance(net, Routable)
    algo, logger = TREADRouting([Route(0.5, 1, -2)], seed=3), FakeLogger()
    algo.apply(Event.INIT, FakeState(Wrapper(net)), logger)
    assert net.router is algo.router and net.router.resolved == resolve_routes([Route(0.5, 1, -2)], net.depth)
    assert logger.hparams["tread/block_flops_fraction"] == routed_flops_fraction(net, net.router.resolved) < 1.0
    if family == "third":
        net.train()
        seen = []
        for layer in net.blocks_:
            layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        net(torch.randn(2, 12, 8))
        assert seen == [12, 6, 6, 6, 12] and net.router.calls == 1
    with pytest.raises(RuntimeError, match="applied twice"):
        TREADRouting([Route(0.5, 1, 2)]).apply(Event.INIT, FakeState(Wrapper(net)), FakeLogger())


def test_protocol_flops_agree_with_the_dit_formula():
    net = DiT(input_size=32, hidden_size=768, depth=12, num_heads=12, num_classes=3)
    resolved = resolve_routes([Route(0.5, 2, 8)], 12)
    assert routed_flops_fraction(net, resolved) == pytest.approx(routed_block_fraction(resolved, 12, 256, 768))


def test_non_routable_model_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a model with a block stack that implements the Routable"):
        TREADRouting([Route(0.5, 1, 2)]).apply(Event.INIT, FakeState(nn.Linear(2, 2)), FakeLogger())
