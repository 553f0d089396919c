"""``tread-scale fid``: FID (and sFID, IS, precision/recall) of generated samples, across ranks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tread_scale.cli.common import add_guidance_args, guidance_from_args

NAME = "fid"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fid``."""
    p = sub.add_parser(NAME, help="FID (and sFID, IS, precision/recall) of generated samples, across ranks")
    p.add_argument("weights", help="a .safetensors file written by training (ema/), or a run folder")
    p.add_argument("--inception", required=True, help="local FID Inception weights (.pth state dict or .safetensors)")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", help="reference statistics .npz (ADM format: mu, sigma)")
    ref.add_argument("--ref-data", help="an MDS dataset (folder or s3://) to compute reference statistics from")
    ref.add_argument("--ref-images", help="an image folder to compute reference statistics from")
    p.add_argument("--ref-num", type=int, help="use at most this many reference images")
    p.add_argument("--save-ref", help="write the computed reference statistics to this .npz")
    p.add_argument("--num", type=int, default=50000, help="generated samples (50000 for reporting)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--extra", action="store_true",
                   help="also Inception Score, and precision/recall when the reference is data or images")
    p.add_argument("--out", help="write the results as JSON here")
    add_guidance_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Evaluate on every rank of the launched process group (if any); rank 0 prints and writes the JSON."""
    import json

    from tread_scale.evaluation.fid import fid_of_weights
    from tread_scale.parallel.process_group import launched_process_group
    from tread_scale.sampling import world

    with launched_process_group():
        result = fid_of_weights(args.weights, args.inception, ref=args.ref, ref_data=args.ref_data,
                                ref_images=args.ref_images, ref_num=args.ref_num, save_ref=args.save_ref,
                                num=args.num, seed=args.seed, extra=args.extra, steps=args.steps,
                                guidance=guidance_from_args(args), vae=args.vae, batch_size=args.batch_size,
                                device=args.device)
        if world()[0] == 0:
            text = json.dumps(result, indent=2)
            sys.stdout.write(text + "\n")
            if args.out:
                Path(args.out).write_text(text + "\n")
    return 0
