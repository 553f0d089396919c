"""``tread-scale sample``: a PNG grid and an ``.npz`` of samples from exported EMA weights.

Class-conditional DiT weights sample labels (``--labels``); text-to-image MMDiT weights sample prompts
(``--prompt``, ``--prompts``), encoded with the local encoders recorded with the weights or given by
``--t5``/``--clip`` and checked against the hashes the training data recorded.
"""

from __future__ import annotations

import argparse
import logging

from tread_scale.cli.common import add_encoder_args, add_guidance_args, guidance_from_args

NAME = "sample"
log = logging.getLogger(__name__)

DEFAULT_GRID_MAX = 64  # tread_scale.sampling.DEFAULT_GRID_MAX, without importing torch to build the parser


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``sample``."""
    p = sub.add_parser(NAME, help="sample a PNG grid and an .npz from exported EMA weights")
    p.add_argument("weights", help="a .safetensors file written by training (ema/), or a run folder")
    p.add_argument("--out", required=True, help="output folder (grid.png, samples.npz)")
    p.add_argument("--num", type=int,
                   help="number of samples, all of them in samples.npz (default: 16, or 4 per prompt)")
    p.add_argument("--grid-max", type=int, default=DEFAULT_GRID_MAX,
                   help=f"at most this many samples in grid.png (default {DEFAULT_GRID_MAX})")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--labels", help="comma-separated labels (default: cycle through the classes); DiT weights")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeatable; sample i uses prompt i mod n); text-to-image (MMDiT) weights")
    p.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one a line (after any --prompt)")
    add_encoder_args(p)
    add_guidance_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Sample on every rank of the launched process group (if any); rank 0 writes the files."""
    from tread_scale.parallel.process_group import launched_process_group
    from tread_scale.errors import ConfigError
    from tread_scale.sampling import read_prompt_file, sample_to_folder

    try:
        labels = [int(x) for x in args.labels.split(",")] if args.labels else None
    except ValueError:
        raise ConfigError(f"--labels {args.labels!r}: expected comma-separated class numbers, e.g. 0,3,7") from None
    prompts = list(args.prompt or []) + (read_prompt_file(args.prompts) if args.prompts else [])
    with launched_process_group():
        out = sample_to_folder(args.weights, args.out, num=args.num, seed=args.seed, labels=labels,
                               prompts=prompts or None, t5=args.t5, clip=args.clip, clip_l=args.clip_l,
                               clip_g=args.clip_g, steps=args.steps,
                               guidance=guidance_from_args(args), vae=args.vae, batch_size=args.batch_size,
                               device=args.device, grid_max=args.grid_max)
    if out:
        log.info("wrote %s", ", ".join(str(v) for v in out.values()))
    return 0
