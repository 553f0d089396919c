"""Parity of our ADM-suite features with independent implementations loading the *same* weight file.

* torch-fidelity's ``inception-v3-compat`` (TF1 resize, ``(x - 128) / 128``, the TF graph's network; it
  exposes ``2048`` = pool_3, ``logits_unbiased`` = ADM's softmax input and ``logits``): the whole pipeline
  from uint8 images.
* pytorch-fid's ``fid_inception_v3`` (FIDInceptionA/C/E): the network on the same preprocessed input (its own
  resize is PyTorch's, not the graph's), with its weight download replaced by our file.

sFID features are checked against a hook on each peer's ``Mixed_6d.branch1x1`` (the TF graph's
``mixed_6/conv``; neither peer returns it), first 7 channels, flattened channels-last.

Measured on CPU (float32): pool, logits and spatial features are bitwise equal to both peers' (max |diff| 0);
the checks allow 1e-4 (other devices and BLAS may reorder sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tread_scale.evaluation.inception import load_inception, resize_bilinear_tf1

TOL = 1e-4


def _spatial_adm(t: torch.Tensor) -> torch.Tensor:
    """ADM's sFID features from an NCHW tensor: first 7 channels, flattened channels-last."""
    return t[:, :7].permute(0, 2, 3, 1).reshape(len(t), -1)


def test_tf1_resize_equals_torch_fidelity():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tf1

    g = torch.Generator().manual_seed(0)
    for h, w in ((21, 30), (256, 256), (512, 384), (299, 299), (7, 5)):
        x = torch.randint(0, 256, (2, 3, h, w), generator=g).float()
        ours = resize_bilinear_tf1(x, 299)
        theirs = tf1(x, size=(299, 299), align_corners=False)
        assert ours.shape == (2, 3, 299, 299)
        assert (ours - theirs).abs().max() <= 1e-4, (h, w)
        if (h, w) == (299, 299):
            assert torch.equal(ours, x)  # same size: the identity, as TF
        else:  # PyTorch's half-pixel bilinear samples elsewhere: a pipeline using it is not ADM's
            assert (F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - theirs).abs().max() > 1


def test_pool_and_logits_equal_torch_fidelity(ours, fidelity, images):
    assert (ours["pool"] - fidelity["pool"]).abs().max() < TOL
    # ADM's IS input: pool_3 @ W without the bias = torch-fidelity's logits_unbiased
    assert (ours["logits"] - fidelity["logits_unbiased"]).abs().max() < TOL
    assert (ours["logits"] + fidelity["fc_bias"] - fidelity["logits"]).abs().max() < TOL
    # the bias is not small, so a biased softmax input would not pass the check above
    assert (fidelity["logits"] - fidelity["logits_unbiased"]).abs().max() > 0.1


def test_pipeline_would_fail_with_pytorch_resize_and_scaling(inception_pth, images, fidelity):
    """A control: the old pipeline (half-pixel resize, x / 127.5 - 1) is far outside the tolerance."""
    net = load_inception(inception_pth)
    x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False) / 127.5 - 1
    old = net.features(x)["pool"].double()
    assert (old - fidelity["pool"]).abs().max() > 100 * TOL


def test_spatial_features_are_mixed_6d_branch1x1_channels_last(ours, fidelity):
    expected = _spatial_adm(fidelity["mixed_6_conv"])
    assert ours["spatial"].shape == (4, 2023) == expected.shape
    assert (ours["spatial"] - expected).abs().max() < TOL
    # neither the old definition (Mixed_6e, channels-first) nor a channels-first flattening matches
    old = fidelity["mixed_6e"][:, :7].flatten(1)
    assert (ours["spatial"] - old).abs().max() > 100 * TOL
    assert (ours["spatial"] - fidelity["mixed_6_conv"][:, :7].flatten(1)).abs().max() > 100 * TOL


def test_network_equals_pytorch_fid(ours, pytorch_fid_net):
    out, theirs = ours, pytorch_fid_net  # ours: net(images) = net.features(preprocess(images))
    assert (out["pool"] - theirs["pool"]).abs().max() < TOL
    assert (out["logits"] - theirs["pool"] @ theirs["fc_weight"].T).abs().max() < TOL
    assert (out["spatial"] - _spatial_adm(theirs["mixed_6_conv"])).abs().max() < TOL
