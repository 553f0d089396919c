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
from tread_scale.imaging import make_grid, save_png
from tread_scale.routing.routes import Route
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


def make_decoder(vae: str | None, meta: dict, device: torch.device):
    """A latents → images function for ``vae`` (local AutoencoderKL folder), or ``None`` for pixel-space data."""
    if vae:
        from tread_scale.data.vae import decode, load_vae

        v = load_vae(vae, device)
        return lambda latents: decode(v, latents)
    if meta["data"].get("vae", "none") != "none":
        log.warning("weights were trained on latents of VAE %r; pass --vae to decode them", meta["data"]["vae"])
    return None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sample_to_folder(weights: str, out: str, *, num: int = 16, seed: int = 0, labels: list[int] | None = None,
                     steps: int | None = None, guidance: Guidance | None = None, vae: str | None = None,
                     batch_size: int = 64, device: str = "auto") -> dict[str, Path]:
    """Sample ``num`` images and write ``grid.png`` and ``samples.npz`` into ``out`` (rank 0).

    Under torch.distributed every rank generates its share (samples ``rank, rank + W, …``); the files are
    identical to a single-process run. Sample ``i`` uses seed ``seed + i``; labels cycle through the
    classes unless given.

    Returns:
        Paths of the written files (``grid``, ``npz``); empty on ranks other than 0.
    """
    from tread_scale.evaluation.generate import generate, rank_indices, world

    dev = resolve_device(device)
    net, meta = load_net(weights, dev)
    objective = meta["objective"]["kind"]
    num_classes = int(meta["data"]["num_classes"])
    default_labels = labels is None
    labels = labels if labels is not None else [i % num_classes for i in range(num)]
    labels = [labels[i % len(labels)] for i in range(num)]
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ConfigError(f"--labels: {bad} outside 0..{num_classes - 1}")
    steps = steps or (40 if objective == "edm" else 50)
    edm = EDM(sigma_data=float(meta["objective"].get("sigma_data", 0.5)))
    rank, world_size = world()
    decode = make_decoder(vae, meta, dev)
    rows = []
    for idx, lat, pixels, ys in generate(net, objective, rank_indices(num, rank, world_size), seed=seed,
                                         num_classes=num_classes, steps=steps, guidance=guidance, edm=edm,
                                         device=dev, batch_size=batch_size, decode=decode, labels=labels):
        rows += list(zip(idx, lat.numpy(), pixels, ys))
    if world_size > 1:
        import torch.distributed as dist

        gathered = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    if rank != 0:
        return {}
    rows.sort(key=lambda r: r[0])
    latents = np.stack([r[1] for r in rows])
    pixels = np.stack([r[2] for r in rows])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    nrow = num_classes if default_labels and num_classes <= 12 else min(num, 8)  # a column per class
    grid = save_png(out_dir / "grid.png", make_grid(pixels, nrow=nrow))
    npz = out_dir / "samples.npz"
    np.savez(npz, latents=latents, labels=np.asarray([r[3] for r in rows]),
             seeds=np.asarray([seed + r[0] for r in rows]), images=pixels)
    return {"grid": grid, "npz": npz}
