"""``tread-scale import-sd3``: SD3 / SD3.5 transformer weights → our safetensors (for ``model.init_from``)."""

from __future__ import annotations

import argparse
import logging

NAME = "import-sd3"
log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``import-sd3``."""
    p = sub.add_parser(NAME, help="SD3 / SD3.5 transformer weights -> our safetensors (for model.init_from)")
    p.add_argument("src", help="a diffusers SD3Transformer2DModel folder (or a pipeline folder with transformer/), "
                               "or a single original-layout SD3/SD3.5 .safetensors file")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--input-size", type=int, default=128,
                   help="latent side for a single file (default 128: 1024x1024 images); a folder's config has it")
    p.add_argument("--empty-prompt", metavar="DATASET",
                   help="a captioned dataset (local or s3://, SD3's text layout) whose encoded empty prompt becomes "
                        "the null condition, so CFG sampling works before any fine-tune")
    return p


def run(args: argparse.Namespace) -> int:
    """Convert the weights."""
    from tread_scale.sd3 import import_sd3

    out = import_sd3(args.src, args.out, args.input_size, empty_prompt=args.empty_prompt)
    log.info("wrote %s (fine-tune with model.init_from=%s and the model keys it records; sample with "
             "tread-scale sample)", out, out)
    return 0
