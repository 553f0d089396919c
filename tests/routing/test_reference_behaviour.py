"""Our routed forward pass equals the reference's routing mechanics (spec §3.2–3.3) given the same subsets.

``benchmarks/reference_style.py`` re-creates those mechanics from the spec (clone at route start, argsort
draw, scatter into a copy, fp32 block after the route) for step-time comparisons; these tests pin that it
and our DiT compute the same thing, so the benchmark compares like with like.
"""

import torch

from benchmarks.reference_style import ReferenceStyleRouting
from tread_scale.models import DiT
from tread_scale.routing import Route, TokenRouter, num_kept, resolve_routes

ROUTES = [Route(0.5, 1, 2), Route(0.25, 4, 5)]


class FixedSubsets(TokenRouter):
    """A router that hands out given kept indices instead of drawing them."""

    def __init__(self, routes, ids):
        super().__init__(routes)
        self.ids = ids

    def schedule(self, batch, num_tokens, device, *, training, **_):
        return {r.start: (r.end, ids) for r, ids in zip(self.resolved, self.ids)} if training else {}


def pair():
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, num_classes=5,
              init="xavier_all")
    net.train()
    return net, ReferenceStyleRouting(net, resolve_routes(ROUTES, net.depth))


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 3, 5])


def test_reference_draw_keeps_the_specified_count_of_distinct_tokens():
    net, reference = pair()
    reference(*inputs())
    assert [ids.shape for ids in reference.drawn] == [(3, num_kept(16, 0.5)), (3, num_kept(16, 0.25))]
    assert all(len(set(row.tolist())) == ids.shape[1] for ids in reference.drawn for row in ids)


def test_same_subsets_give_the_same_output_and_gradients():
    net, reference = pair()
    x, t, y = inputs()
    out_ref = reference(x, t, y)
    out_ref.square().mean().backward()
    grads_ref = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)

    net.attach_router(FixedSubsets(ROUTES, reference.drawn))  # the reference's unsorted indices, as drawn
    out = net(x, t, y)
    out.square().mean().backward()
    assert torch.equal(out, out_ref)
    for name, param in net.named_parameters():
        torch.testing.assert_close(param.grad, grads_ref[name], rtol=0, atol=1e-7, msg=name)


def test_reference_runs_the_block_after_each_route_in_fp32_under_autocast():
    net, reference = pair()
    seen = []
    for i, block in enumerate(net.blocks):
        block.attn.qkv.register_forward_hook(lambda m, a, out, i=i: seen.append((i, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference(*inputs())
    fp32 = [i for i, dtype in seen if dtype == torch.float32]
    assert fp32 == [3]  # after route 1→2; route 4→5 ends at the last block, so its rule has no block to apply to
