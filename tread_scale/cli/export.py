"""``tread-scale export``: exported EMA weights → a diffusers ``DiTTransformer2DModel`` folder."""

from __future__ import annotations

import argparse
import logging

NAME = "export"
log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export``."""
    p = sub.add_parser(NAME, help="exported EMA weights -> diffusers DiTTransformer2DModel folder")
    p.add_argument("weights", help="a .safetensors file written by training (ema/), or a run folder")
    p.add_argument("--out", required=True, help="output folder")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the diffusers folder."""
    from tread_scale.export import export_diffusers
    from tread_scale.weights import resolve_weights

    log.info("wrote %s", export_diffusers(resolve_weights(args.weights), args.out))
    return 0
