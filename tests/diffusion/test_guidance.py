import pytest
import torch

from tread_scale.diffusion import Guidance, GuidedPredictor
from tread_scale.errors import ConfigError
from tread_scale.models import DiT
from tread_scale.routing import Route, TokenRouter
from tread_scale.sampling import sample_latents, seeded_noise


def tiny_net(routes=(Route(0.5, 1, 2),)):
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4, num_classes=5,
              init="xavier_all")
    if routes:
        net.attach_router(TokenRouter(list(routes), seed=1))
    return net.eval()


def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 3, 4])


def test_equal_rates_with_one_seed_leave_the_prediction_unchanged():
    net = tiny_net()
    x, t, y = inputs()
    guided = GuidedPredictor(net, Guidance(tread_scale=3.0, strong_rate=0.5, weak_rate=0.5), net.null_label, seed=9)
    out = guided(x, t, y, level=1.0)
    from tread_scale.rng import mix_seed

    single = net(x, t, y, force_routing=True, rate_override=0.5, routing_seed=mix_seed(9, 1))
    assert torch.equal(out, single)


def test_both_rates_zero_equal_dense_sampling():
    net = tiny_net()
    noise = seeded_noise([0, 1, 2], (4, 8, 8))
    labels = torch.tensor([0, 1, 2])
    for objective in ("edm", "rf"):
        dense = sample_latents(net, objective, labels, noise, 3)
        tread = sample_latents(net, objective, labels, noise, 3,
                               Guidance(tread_scale=2.0, strong_rate=0.0, weak_rate=0.0))
        assert torch.equal(dense, tread), objective


def test_cfg_formula_and_scale_one_is_conditional():
    net = tiny_net()
    x, t, y = inputs()
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, net.null_label))
    assert torch.equal(GuidedPredictor(net, Guidance(cfg_scale=1.0), net.null_label)(x, t, y, 1.0), cond)
    out = GuidedPredictor(net, Guidance(cfg_scale=4.0), net.null_label)(x, t, y, 1.0)
    assert torch.allclose(out, uncond + 4.0 * (cond - uncond), atol=1e-6)


class Recorder(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    @property
    def router(self):
        return self.net.router

    def forward(self, x, t, y, **kw):
        self.calls.append((y.tolist(), kw.get("rate_override")))
        return self.net(x, t, y, **kw)


@pytest.mark.parametrize("drop", [False, True])
def test_tread_guidance_keeps_the_label_by_default(drop):
    net = Recorder(tiny_net())
    x, t, y = inputs()
    GuidedPredictor(net, Guidance(tread_scale=2.0, strong_rate=0.2, weak_rate=0.6, tread_drop_label=drop), 5)(x, t, y, 1.0)
    expected = [5, 5, 5] if drop else [0, 3, 4]
    assert net.calls == [(expected, 0.2), (expected, 0.6)]


def test_tread_and_cfg_together():
    net = Recorder(tiny_net())
    x, t, y = inputs()
    out = GuidedPredictor(net, Guidance(cfg_scale=2.0, tread_scale=1.5, strong_rate=0.2, weak_rate=0.6), 5, seed=4)(
        x, t, y, 1.0)
    assert [c[1] for c in net.calls] == [0.2, 0.6, None]
    from tread_scale.rng import mix_seed

    s = mix_seed(4, 1)
    strong = net.net(x, t, y, force_routing=True, rate_override=0.2, routing_seed=s)
    weak = net.net(x, t, y, force_routing=True, rate_override=0.6, routing_seed=s)
    uncond = net.net(x, t, torch.full_like(y, 5))
    tread = weak + 1.5 * (strong - weak)
    assert torch.allclose(out, uncond + 2.0 * (tread - uncond), atol=1e-6)


def test_guidance_interval_limits_guidance():
    net = tiny_net()
    x, t, y = inputs()
    g = GuidedPredictor(net, Guidance(cfg_scale=3.0, interval=(0.5, 2.0)), net.null_label)
    assert torch.equal(g(x, t, y, level=10.0), net(x, t, y))
    assert not torch.equal(g(x, t, y, level=1.0), net(x, t, y))


def test_guidance_validation():
    with pytest.raises(ConfigError, match="strong_rate .* must not exceed weak_rate"):
        Guidance(tread_scale=2.0, strong_rate=0.7, weak_rate=0.3).validate()
    with pytest.raises(ConfigError, match="needs a model with routes"):
        GuidedPredictor(tiny_net(routes=()), Guidance(tread_scale=2.0), 5)
