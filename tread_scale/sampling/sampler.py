"""The sampling loop of a trained DiT or MMDiT: per-sample seeded noise, EDM-Heun or rectified-flow Euler, guidance.

Noise and labels of sample ``i`` come from its own seed, so a result does not depend on the batch size,
the device count or the order of generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tread_scale.diffusion.edm import EDM, edm_heun_sample
from tread_scale.diffusion.guidance import Guidance, GuidedPredictor
from tread_scale.errors import ConfigError
from tread_scale.diffusion.rectified_flow import rf_euler_sample


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``(len(seeds), *shape)`` standard normal noise, sample ``i`` drawn from a CPU generator seeded ``seeds[i]``."""
    out = torch.empty(len(seeds), *shape)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(*shape, generator=torch.Generator().manual_seed(int(s)))
    return out


@torch.no_grad()
def sample_latents(
    net: nn.Module,
    objective: str,
    labels: torch.Tensor | Any,
    noise: torch.Tensor,
    steps: int,
    guidance: Guidance | None = None,
    edm: EDM | None = None,
    routing_seed: int | list[int] = 0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Generate latents with the network in eval mode.

    Args:
        net: The DiT or MMDiT (routing applies only where guidance forces it).
        objective: ``edm`` (Heun) or ``rf`` (Euler).
        labels: ``(B,)`` class labels, or a batch-B :class:`~tread_scale.models.conditioning.TextCondition`
            on the noise's device (the network's ``null_label``, the empty prompt, is the CFG branch).
        noise: ``(B, C, H, W)`` standard normal noise (see :func:`seeded_noise`).
        steps: Sampler steps.
        guidance: CFG / TREAD guidance; ``None`` for plain conditional sampling.
        edm: EDM preconditioning constants (σ_data) for ``edm``.
        routing_seed: Seed of the routing subsets drawn by TREAD guidance; pass the per-sample seeds to make
            TREAD-guided samples independent of batching.
        shift: Rectified flow's timestep shift, as trained (``objective.shift``).

    Returns:
        ``(B, C, H, W)`` float32 latents on ``noise.device``.

    Raises:
        ValueError: If ``objective`` is neither ``edm`` nor ``rf``.
        ConfigError: If guidance needs the unconditional branch and the network has no null condition.
    """
    g = guidance or Guidance()
    if (g.uses_cfg or (g.uses_tread and g.tread_drop_label)) and not getattr(net, "has_null_condition", True):
        raise ConfigError("these weights have no null condition (the encoded empty prompt), which CFG's "
                          "unconditional branch needs: imported SD3 weights get it with `tread-scale import-sd3 "
                          "--empty-prompt DATASET` (a captioned dataset in the model's text layout) or from a "
                          "fine-tune's data; or sample without CFG (--cfg-scale 1)")
    was_training = net.training
    net.eval()
    try:
        guided = GuidedPredictor(net, g, null_label=net.null_label, seed=routing_seed)
        b = noise.shape[0]
        if objective == "edm":
            edm = edm or EDM()

            def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                xf = x.float()
                s = sigma.float().expand(b)
                net_in, c_noise = edm.model_input(xf, s)
                raw = guided(net_in, c_noise, labels, float(sigma))
                return edm.denoised(xf, s, raw.float()).double()

            return edm_heun_sample(denoise, noise, num_steps=steps).float()
        if objective == "rf":
            return rf_euler_sample(lambda z, t: guided(z, t.expand(b), labels, float(t)), noise, num_steps=steps,
                                   shift=shift)
        raise ValueError(f"unknown objective {objective!r} (expected 'edm' or 'rf')")
    finally:
        net.train(was_training)
