"""Shared fixtures: one randomly initialised FID Inception weight file and a few small images, per session."""

from __future__ import annotations

import pytest
import torch

from tread_scale.devtools.eval_models import randomize_inception
from tread_scale.evaluation.inception import FIDInception, load_inception, preprocess

#: Random weights that keep activations O(1) through all 94 layers (see the function's docstring).
randomize_ = randomize_inception


@pytest.fixture(scope="session")
def inception_pth(tmp_path_factory):
    """A ``.pth`` state dict (torchvision key layout, as pytorch-fid's file) of a random FID Inception."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(randomize_(FIDInception()).net.state_dict(), path)
    return path


def make_images(n: int = 6, h: int = 21, w: int = 30, seed: int = 1) -> torch.Tensor:
    """``n`` unlike uint8 images, ``h`` x ``w``: noise, gradients, stripes, flat colours, blocks.

    Not square and far from 299, so a resize with other sampling positions changes the features.
    """
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    out = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            img = torch.rand(3, h, w, generator=g)
        elif kind == 1:
            img = torch.stack([xx, yy, 1 - xx])
        elif kind == 2:
            img = ((xx * 7).floor() % 2).expand(3, h, w) * torch.rand(3, 1, 1, generator=g)
        elif kind == 3:
            img = torch.rand(3, 1, 1, generator=g).expand(3, h, w)
        elif kind == 4:
            img = torch.rand(3, 4, 5, generator=g).repeat_interleave(6, 1).repeat_interleave(6, 2)[:, :h, :w]
        else:
            img = (torch.sin(xx * 20 + yy * 9) * 0.5 + 0.5).expand(3, h, w) * torch.rand(3, 1, 1, generator=g)
        out.append((img * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


@pytest.fixture(scope="session")
def images():
    """Four unlike uint8 images, 21 x 30 (each costs ~1 s per network on a 2-core CPU)."""
    return make_images(4)


@pytest.fixture(scope="session")
def ours(inception_pth, images):
    """Our features of ``images`` (float64 copies)."""
    net = load_inception(inception_pth)
    return {k: v.double() for k, v in net(images).items()}


@pytest.fixture(scope="session")
def fidelity(inception_pth, images):
    """torch-fidelity's features of the same images, and its Mixed_6d.branch1x1 / Mixed_6e outputs."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fe = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                     feature_extractor_weights_path=str(inception_pth))
    seen = {}
    fe.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed_6_conv", o.clone()))
    fe.Mixed_6e.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed_6e", o.clone()))
    with torch.no_grad():
        pool, unbiased, biased = fe(images)
    return {"pool": pool.double(), "logits_unbiased": unbiased.double(), "logits": biased.double(),
            "fc_bias": fe.fc.bias.detach().double(), **{k: v.double() for k, v in seen.items()}}


@pytest.fixture(scope="session")
def pytorch_fid_net(inception_pth, images):
    """pytorch-fid's FID Inception (its download replaced by our file) on our preprocessed input."""
    import pytorch_fid.inception as pfi

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url",
                   lambda url, **kw: torch.load(inception_pth, map_location="cpu", weights_only=True))
        net = pfi.fid_inception_v3().eval()
    seen = {}
    net.avgpool.register_forward_hook(lambda m, i, o: seen.__setitem__("pool", o.flatten(1).clone()))
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed_6_conv", o.clone()))
    with torch.no_grad():
        logits = net(preprocess(images))  # its own resize is PyTorch's: feed it the graph's input
    return {"logits": logits.double(), "pool": seen["pool"].double(), "mixed_6_conv": seen["mixed_6_conv"].double(),
            "fc_weight": net.fc.weight.detach().double()}
