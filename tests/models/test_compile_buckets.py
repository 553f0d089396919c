"""``train.compile`` with aspect-ratio buckets: the number of compiled graphs does not grow with the buckets.

Blocks are compiled one by one (``trainer/model.py``). The first change of token count makes dynamo treat the
sequence length as dynamic (PyTorch's automatic dynamic shapes), so one more graph serves every later bucket
and routed length. Traced with the ``eager`` backend: what is counted is dynamo's graphs, not code generation.
"""

import pytest
import torch

from tread_scale.models.conditioning import TextCondition
from tread_scale.models.dit import DiT
from tread_scale.models.mmdit import MMDiT
from tread_scale.routing import Route
from tread_scale.routing.router import TokenRouter

BUCKETS = [(8, 8), (8, 12), (12, 8), (4, 16), (16, 4), (12, 12)]


@pytest.mark.parametrize("family,kinds", [("dit", 1), ("mmdit", 2)])  # the MMDiT's last block has no text output
def test_at_most_two_graphs_per_block_kind_for_any_number_of_buckets(family, kinds):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    common = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=4)
    net = DiT(num_classes=3, **common) if family == "dit" else MMDiT(text_dim=16, pooled_dim=8, text_len=4, **common)
    net.attach_router(TokenRouter([Route(0.5, 1, 1)]))
    for block in net.blocks:
        block.compile(backend="eager")
    net.train()
    for h, w in BUCKETS * 2:
        x, t = torch.randn(2, 4, h, w), torch.rand(2)
        y = torch.tensor([0, 1]) if family == "dit" else \
            TextCondition(torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 8))
        out = net(x, t, y)
        assert out.shape == x.shape
        out.sum().backward()
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 * kinds
    torch._dynamo.reset()
