"""Loading a diffusers ``AutoencoderKL`` from a local path, and encoding/decoding with it.

Nothing is downloaded: ``path`` must be a folder written by ``save_pretrained`` (``config.json`` plus
weights). Encoding runs in float32; latents are multiplied by the VAE's ``scaling_factor``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tread_scale.errors import ConfigError

log = logging.getLogger(__name__)


def load_vae(path: str, device: str | torch.device = "cpu"):
    """Load an ``AutoencoderKL`` from a local folder, in float32 eval mode.

    Raises:
        ConfigError: If the folder or its ``config.json`` is missing, or it is not an AutoencoderKL.
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"--vae {path!r}: no config.json there; expected a local folder written by "
                          "AutoencoderKL.save_pretrained (nothing is downloaded)")
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(p), local_files_only=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--vae {path!r}: cannot load an AutoencoderKL: {e}") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", 0.18215))


def vae_downsample(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
    """``(B, 3, H, W)`` images in [-1, 1] → scaled latents (float32)."""
    dist = vae.encode(images.to(torch.float32)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mean
    return z * vae_scaling_factor(vae)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents → ``(B, 3, H, W)`` images in [-1, 1] (float32)."""
    return vae.decode(latents.to(torch.float32) / vae_scaling_factor(vae)).sample.clamp(-1, 1)
