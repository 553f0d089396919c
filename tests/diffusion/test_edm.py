import math

import pytest
import torch

from tread_scale.diffusion import EDM, RectifiedFlow, edm_heun_sample, edm_sigma_steps, rf_euler_sample
from tread_scale.models import DiT
from tread_scale.routing import Route, TokenRouter


@pytest.mark.parametrize("sigma,c_skip,c_out,c_in,c_noise,weight", [
    (0.5, 0.5, 0.3535534, 1.4142136, math.log(0.5) / 4, 8.0),
    (2.0, 0.0588235, 0.4850713, 0.4850713, math.log(2.0) / 4, 4.25),
    (0.002, 0.99998400, 0.0019999840, 1.99998400, math.log(0.002) / 4, 250004.0),
])
def test_edm_preconditioning_values(sigma, c_skip, c_out, c_in, c_noise, weight):
    edm = EDM()
    s = torch.tensor([sigma], dtype=torch.float64)
    got = [v.item() for v in edm.preconditioning(s)]
    assert got == pytest.approx([c_skip, c_out, c_in, c_noise], rel=1e-6)
    assert edm.loss_weight(s).item() == pytest.approx(weight, rel=1e-6)


def test_edm_defaults_are_the_reference_ones():
    edm = EDM()
    assert (edm.P_mean, edm.P_std, edm.sigma_data, edm.label_dropout) == (-1.2, 1.2, 0.5, 0.1)


def tiny_net(routes=()):
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=5)
    if routes:
        net.attach_router(TokenRouter(routes, seed=1))
    return net


@pytest.mark.parametrize("objective", [EDM(), RectifiedFlow()])
def test_loss_falls_on_a_fixed_batch(objective):
    net = tiny_net([Route(0.5, 1, 1)])
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(5, 4, 8, 8, generator=g) * 0.5  # one clean latent per class: learnable in 50 steps
    y = torch.arange(16) % 5
    x = patterns[y]
    level = torch.full((16,), 0.5) if isinstance(objective, RectifiedFlow) else torch.full((16,), 0.3)
    noise = torch.randn(16, 4, 8, 8, generator=g)

    def probe():
        net.eval()
        with torch.no_grad():
            return objective.loss_at(net, x, y, level, noise).mean().item()

    before = probe()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net.train()
    losses = []
    for _ in range(50):
        loss = objective.training_loss(net, x, y, net.null_label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = probe()
    assert after < 0.8 * before, (before, after)
    assert sum(losses[-10:]) < sum(losses[:10])


def test_label_dropout_uses_null_label():
    from tread_scale.diffusion.edm import drop_labels

    torch.manual_seed(0)
    y = torch.zeros(10000, dtype=torch.long)
    dropped = drop_labels(y, 0.1, null_label=7)
    assert set(dropped.unique().tolist()) == {0, 7}
    assert 0.08 < (dropped == 7).float().mean().item() < 0.12
    assert torch.equal(drop_labels(y, 0.0, 7), y)


def test_sigma_steps_follow_karras_schedule():
    t = edm_sigma_steps(40)
    assert len(t) == 41 and t[-1] == 0
    assert t[0].item() == pytest.approx(80.0) and t[-2].item() == pytest.approx(0.002)
    assert torch.all(t[:-1][1:] < t[:-1][:-1])


def test_heun_recovers_a_point_mass_and_counts_nfe():
    x0 = torch.randn(2, 4, 8, 8)
    calls = []

    def denoise(x, sigma):
        calls.append(float(sigma))
        return x0.double().expand_as(x)

    out = edm_heun_sample(denoise, torch.randn(2, 4, 8, 8), num_steps=10)
    assert torch.allclose(out.float(), x0, atol=1e-5)
    assert len(calls) == 2 * 10 - 1


def test_rf_euler_recovers_a_point_mass():
    x0 = torch.randn(2, 4, 8, 8)
    out = rf_euler_sample(lambda z, t: (z - x0) / t, torch.randn(2, 4, 8, 8), num_steps=7)
    assert torch.allclose(out, x0, atol=1e-5)


@pytest.mark.parametrize("objective,steps", [("edm", 4), ("rf", 5)])
def test_samplers_on_a_real_net_are_finite(objective, steps):
    from tread_scale.sampling import sample_latents, seeded_noise

    net = tiny_net()
    noise = seeded_noise([1, 2, 3], (4, 8, 8))
    out = sample_latents(net, objective, torch.tensor([0, 1, 2]), noise, steps)
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()


def test_seeded_noise_does_not_depend_on_batching():
    from tread_scale.sampling import seeded_noise

    both = seeded_noise([5, 6], (4, 8, 8))
    assert torch.equal(both[1], seeded_noise([6], (4, 8, 8))[0])
