"""Evaluation models for the demo and the tests when the real ones are not on disk.

Nothing can be downloaded at run time, so the demo looks for the real files in ``.cache/`` (pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` and a ``clip/`` transformers CLIPModel folder, e.g.
openai/clip-vit-base-patch16 saved there) and otherwise builds random stand-ins: their FID and CLIP score show
the pipeline and the protocol record, not image quality, and results say so.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from tread_scale.evaluation.inception import FIDInception, save_inception

log = logging.getLogger(__name__)

STANDARD_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"


def randomize_inception(model: FIDInception, seed: int = 0) -> FIDInception:
    """Random weights that keep activations O(1) through all 94 layers (He-scaled convs, random batch norms).

    PyTorch's default init makes every feature ~1e-8 by the last block, so every FID would be ~0; with these
    weights features differ between images (and a wrong resize or layer changes them visibly).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features) * 3)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def demo_eval_models(cache: Path, vocab: list[str]) -> tuple[str, str, bool]:
    """``(inception, clip_folder, real)``: the real models found in ``cache``, or random ones built there.

    Args:
        cache: The folder to look in and build in (``.cache/``).
        vocab: Words the stand-in CLIP's tokenizer knows (the demo's caption words).
    """
    from tread_scale.evaluation.clip_score import build_tiny_clip

    inception, clip = cache / STANDARD_INCEPTION, cache / "clip"
    real = inception.is_file() and (clip / "config.json").is_file()
    if real:
        return str(inception), str(clip), True
    stand_in = cache / "demo-eval-models"
    if not (stand_in / "inception.safetensors").is_file():
        stand_in.mkdir(parents=True, exist_ok=True)
        save_inception(randomize_inception(FIDInception()), stand_in / "inception.safetensors")
    if not (stand_in / "clip" / "config.json").is_file():
        build_tiny_clip(stand_in / "clip", vocab=vocab)
    log.warning("evaluation with random stand-ins for Inception and CLIP (%s): put %s and a clip/ CLIPModel folder "
                "in %s for real ones", stand_in, STANDARD_INCEPTION, cache)
    return str(stand_in / "inception.safetensors"), str(stand_in / "clip"), False
