"""``tread-scale fid``: FID (and sFID, IS, precision/recall) of generated samples, across ranks.

Two modes: one weight file (or a run folder's ``ema/latest.safetensors``) gives one JSON result; a run folder
with ``--every N``/``--all`` gives the FID curve of its exported checkpoints as JSON lines
(:mod:`tread_scale.evaluation.curve`), resuming where a previous call stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tread_scale.cli.common import (add_encoder_args, add_guidance_args, encoders_from_args, guidance_from_args,
                                    parse_guidance_spec)
from tread_scale.errors import ConfigError

NAME = "fid"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fid``."""
    p = sub.add_parser(NAME, help="FID (and sFID, IS, precision/recall) of generated samples, across ranks")
    p.add_argument("weights", help="a .safetensors file written by training (ema/), or a run folder (its "
                                   "ema/latest.safetensors; with --every/--all, its exported checkpoints)")
    p.add_argument("--inception", required=True, help="local FID Inception weights (.pth state dict or .safetensors)")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", help="reference statistics .npz (ADM format: mu, sigma)")
    ref.add_argument("--ref-data", help="an MDS dataset (folder or s3://) to compute reference statistics from")
    ref.add_argument("--ref-images", help="an image folder to compute reference statistics from")
    p.add_argument("--ref-num", type=int, help="use at most this many reference images")
    p.add_argument("--save-ref", help="write the computed reference statistics to this .npz")
    p.add_argument("--num", type=int,
                   help="generated samples (default 50000, as for reporting; for a text model one per prompt)")
    p.add_argument("--prompts", metavar="FILE",
                   help="text-to-image (MMDiT) weights: a text file of prompts, one a line, one image each, encoded "
                        "with the encoders recorded with the weights (or --t5/--clip/--clip-l/--clip-g)")
    p.add_argument("--prompt-data", metavar="DATASET",
                   help="text-to-image weights: a captioned dataset (local or s3://, e.g. a held-out split) whose "
                        "first --num captions and stored embeddings are the prompts")
    p.add_argument("--clip-score", metavar="DIR",
                   help="a local CLIP folder (transformers CLIPModel): also the CLIP score of each image with its "
                        "prompt, torchmetrics' convention")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--extra", action="store_true",
                   help="also Inception Score, and precision/recall when the reference is data or images")
    curve = p.add_mutually_exclusive_group()
    curve.add_argument("--every", metavar="Nba",
                       help="FID curve: evaluate the run folder's ema/ba<N>.safetensors at multiples of N batches "
                            "(e.g. 10000ba), one JSON line each; checkpoints already in --out are skipped")
    curve.add_argument("--all", action="store_true", help="FID curve of every exported checkpoint (as --every)")
    p.add_argument("--val-data", metavar="DATASET",
                   help="also the fixed-timestep validation loss (docs/evaluation.md) of each evaluated checkpoint "
                        "on this dataset's first --val-num samples (local or s3://; e.g. a held-out split)")
    p.add_argument("--val-num", type=int, default=64, help="samples of --val-data (default 64)")
    p.add_argument("--val-split", help="split folder of --val-data, if any")
    p.add_argument("--sweep", action="append", metavar="SPEC",
                   help="a guidance setting to evaluate (repeatable: a sweep, one JSON line each, with sampling FLOPs "
                        "per image): comma-separated cfg=, tread=, strong=, weak=, interval=LOW:HIGH, drop_label= "
                        "replacing the guidance options, e.g. --sweep cfg=1.5 --sweep cfg=1.5,tread=1.3")
    p.add_argument("--out", help="write the results as JSON here; with --every/--all, the JSON-lines curve "
                                 "(default: <run>/fid_curve.jsonl)")
    add_encoder_args(p)
    add_guidance_args(p)
    return p


def _fid_kwargs(args: argparse.Namespace) -> dict:
    from tread_scale.sampling import read_prompt_file

    return dict(inception=args.inception, ref=args.ref, ref_data=args.ref_data, ref_images=args.ref_images,
                ref_num=args.ref_num, save_ref=args.save_ref, num=args.num, seed=args.seed, extra=args.extra,
                steps=args.steps, guidance=guidance_from_args(args), vae=args.vae, batch_size=args.batch_size,
                device=args.device, prompts=read_prompt_file(args.prompts) if args.prompts else None,
                prompt_data=args.prompt_data, clip=args.clip_score, encoders=encoders_from_args(args))


def _val_kwargs(args: argparse.Namespace) -> dict | None:
    if not args.val_data:
        return None
    return dict(data=args.val_data, num_samples=args.val_num, split=args.val_split, device=args.device)


def _sweep(args: argparse.Namespace) -> int:
    """FID (and CLIP score) of one weight file under each ``--sweep`` guidance setting, with sampling FLOPs per
    image and their ratio to the first setting's. The reference is computed once, for the first setting."""
    import dataclasses
    import logging

    from tread_scale.evaluation.fid import fid_of_weights
    from tread_scale.sampling import world

    log = logging.getLogger(__name__)
    kwargs = _fid_kwargs(args)
    settings = [parse_guidance_spec(spec, kwargs["guidance"]) for spec in args.sweep]  # all checked first
    records, reuse = [], {}
    for i, guidance in enumerate(settings):
        result = fid_of_weights(args.weights, **{**kwargs, "guidance": guidance}, reuse=reuse)
        first = records[0]["sampling_flops_per_image"] if records else result["sampling_flops_per_image"]
        record = {"sweep": args.sweep[i], "guidance": dataclasses.asdict(guidance), **result,
                  "flops_vs_first": result["sampling_flops_per_image"] / first}
        records.append(record)
        if world()[0] == 0:
            sys.stdout.write(json.dumps(record) + "\n")
            log.info("sweep %d/%d %-40s fid %.4g%s  sampling %.3g GFLOP/image (x%.3f of the first)", i + 1,
                     len(settings), args.sweep[i], result["fid"],
                     f"  clip {result['clip_score']:.4g}" if "clip_score" in result else "",
                     result["sampling_flops_per_image"] / 1e9, record["flops_vs_first"])
    if args.out and world()[0] == 0:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    return 0


def _check_curve_args(args: argparse.Namespace) -> int | None:
    """``every`` in batches (``None`` for ``--all``), after checking the curve mode's arguments.

    Raises:
        ConfigError: If the positional is not a run folder or ``--out`` is not a ``.jsonl``.
    """
    from tread_scale.evaluation.curve import parse_every

    every = parse_every(args.every) if args.every is not None else None
    if not Path(args.weights).is_dir():
        raise ConfigError(f"--every/--all evaluate the exported checkpoints of a run folder; {args.weights!r} is "
                          "not a folder (for one weight file, leave out --every/--all)")
    if args.out is not None and Path(args.out).suffix != ".jsonl":
        raise ConfigError(f"--out {args.out!r}: with --every/--all the curve is written as JSON lines; give a "
                          ".jsonl file")
    return every


def run(args: argparse.Namespace) -> int:
    """Evaluate on every rank of the launched process group (if any); rank 0 prints and writes the results."""
    from tread_scale.parallel.process_group import launched_process_group
    from tread_scale.sampling import world

    curve = args.every is not None or args.all
    every = _check_curve_args(args) if curve else None
    if args.sweep and (curve or args.val_data):
        raise ConfigError("--sweep evaluates one weight file under several guidance settings; it does not combine "
                          "with --every/--all or --val-data")
    if args.sweep and args.out and Path(args.out).suffix != ".jsonl":
        raise ConfigError(f"--out {args.out!r}: a sweep is written as JSON lines; give a .jsonl file")
    with launched_process_group():
        if curve:
            from tread_scale.evaluation.curve import fid_curve

            for record in fid_curve(args.weights, args.out, every, val=_val_kwargs(args), **_fid_kwargs(args)):
                sys.stdout.write(json.dumps(record) + "\n")
            return 0
        from tread_scale.evaluation.fid import fid_of_weights

        if args.sweep:
            return _sweep(args)
        kwargs = _fid_kwargs(args)
        result = fid_of_weights(args.weights, kwargs.pop("inception"), **kwargs)
        if args.val_data:
            from tread_scale.evaluation.val_loss import val_loss_of_weights

            result.update(val_loss_of_weights(args.weights, **_val_kwargs(args)))
        if world()[0] == 0:
            text = json.dumps(result, indent=2)
            sys.stdout.write(text + "\n")
            if args.out:
                Path(args.out).write_text(text + "\n")
    return 0
