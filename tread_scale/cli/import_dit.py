"""``tread-scale import-dit``: a facebookresearch/DiT checkpoint → our safetensors (for ``model.init_from``)."""

from __future__ import annotations

import argparse
import logging

NAME = "import-dit"
log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``import-dit``."""
    p = sub.add_parser(NAME, help="a facebookresearch/DiT checkpoint -> our safetensors (for model.init_from)")
    p.add_argument("checkpoint", help="DiT .pt: a state dict, or a training checkpoint {model, ema, opt, args}")
    p.add_argument("--model", required=True, help="registry name, e.g. DiT-XL/2")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights of a training checkpoint to import (default: ema, as DiT's sample.py)")
    return p


def run(args: argparse.Namespace) -> int:
    """Convert the checkpoint."""
    from tread_scale.export import import_facebook_dit

    out = import_facebook_dit(args.checkpoint, args.out, args.model, args.num_classes, args.input_size,
                              args.in_channels, weights=args.weights)
    log.info("wrote %s (use it with model.init_from=%s)", out, out)
    return 0
