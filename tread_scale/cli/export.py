"""``tread-scale export``: exported EMA weights → a diffusers folder (``DiTTransformer2DModel`` for a DiT,
``SD3Transformer2DModel`` for an MMDiT)."""

from __future__ import annotations

import argparse
import logging

NAME = "export"
log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export``."""
    p = sub.add_parser(NAME, help="exported EMA weights -> a diffusers folder (DiT, or SD3 for an MMDiT)")
    p.add_argument("weights", help="a .safetensors file written by training (ema/), or a run folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["diffusers"], default="diffusers",
                   help="diffusers (default): DiTTransformer2DModel for a DiT, SD3Transformer2DModel for an MMDiT")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the diffusers folder."""
    from tread_scale.export import export_diffusers
    from tread_scale.weights import read_meta, resolve_weights

    path = resolve_weights(args.weights)
    if read_meta(path).model_config().model_family() == "mmdit":
        from tread_scale.sd3 import export_sd3_diffusers

        log.info("wrote %s (an SD3Transformer2DModel)", export_sd3_diffusers(path, args.out))
        return 0
    log.info("wrote %s", export_diffusers(path, args.out))
    return 0
