"""``tread-scale sample``: exported EMA weights → a PNG grid and an ``.npz`` of samples."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from tread_scale.config import ModelConfig, RoutingConfig
from tread_scale.config_schema import from_dict
from tread_scale.diffusion.edm import EDM
from tread_scale.diffusion.guidance import Guidance
from tread_scale.errors import CheckpointError, ConfigError
from tread_scale.factory import build_dit
from tread_scale.imaging import make_grid, save_png, to_uint8
from tread_scale.routing.routes import Route
from tread_scale.sampling import sample_latents, seeded_noise
from tread_scale.weights import load_weights

log = logging.getLogger(__name__)


def resolve_weights(path: str) -> Path:
    """A weights file, or ``<run>/ema/latest.safetensors`` for a run folder."""
    p = Path(path)
    if p.is_dir():
        candidate = p / "ema" / "latest.safetensors"
        if not candidate.is_file():
            raise CheckpointError(f"{p} is a folder without ema/latest.safetensors (not a finished training run)")
        return candidate
    return p


def load_net(path: str, device: torch.device):
    """Rebuild the DiT (with its routes) from an exported weight file."""
    weights, meta = load_weights(resolve_weights(path))
    model_cfg = from_dict(ModelConfig, meta["model"], "model")
    routing = from_dict(RoutingConfig, meta.get("routing", {}), "routing")
    routes = [Route(r.rate, r.start, r.end) for r in routing.routes]
    net = build_dit(model_cfg, routes)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the recorded model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return net.to(device).eval(), meta


def sample_to_folder(weights: str, out: str, *, num: int = 16, seed: int = 0, labels: list[int] | None = None,
                     steps: int | None = None, guidance: Guidance | None = None, vae: str | None = None,
                     batch_size: int = 64, device: str = "auto") -> dict[str, Path]:
    """Sample ``num`` images and write ``grid.png`` and ``samples.npz`` into ``out``.

    Returns:
        Paths of the written files (``grid``, ``npz``).
    """
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    net, meta = load_net(weights, dev)
    objective = meta["objective"]["kind"]
    num_classes = int(meta["data"]["num_classes"])
    default_labels = labels is None
    labels = labels if labels is not None else [i % num_classes for i in range(num)]
    if len(labels) != num:
        labels = [labels[i % len(labels)] for i in range(num)]
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ConfigError(f"--labels: {bad} outside 0..{num_classes - 1}")
    steps = steps or (40 if objective == "edm" else 50)
    edm = EDM(sigma_data=float(meta["objective"].get("sigma_data", 0.5)))
    seeds = [seed + i for i in range(num)]
    chunks = []
    for lo in range(0, num, batch_size):
        s, y = seeds[lo: lo + batch_size], labels[lo: lo + batch_size]
        noise = seeded_noise(s, (net.in_channels, *net.input_size)).to(dev)
        chunks.append(sample_latents(net, objective, torch.tensor(y, device=dev), noise, steps, guidance, edm=edm,
                                     routing_seed=list(s)).cpu())
    latents = torch.cat(chunks)
    images = latents
    if vae:
        from tread_scale.data.vae import decode, load_vae

        v = load_vae(vae, dev)
        images = torch.cat([decode(v, latents[i: i + batch_size].to(dev)).cpu() for i in range(0, num, batch_size)])
    elif meta["data"].get("vae", "none") != "none":
        log.warning("weights were trained on latents of VAE %r; pass --vae to decode them", meta["data"]["vae"])
    pixels = to_uint8(images)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    nrow = num_classes if default_labels and num_classes <= 12 else min(num, 8)  # a column per class
    grid = save_png(out_dir / "grid.png", make_grid(pixels, nrow=nrow))
    npz = out_dir / "samples.npz"
    np.savez(npz, latents=latents.numpy(), labels=np.asarray(labels), seeds=np.asarray(seeds), images=pixels)
    return {"grid": grid, "npz": npz}
