"""``tread-scale sample``: a PNG grid and an ``.npz`` of samples from exported EMA weights.

Class-conditional DiT weights sample labels (``--labels``); text-to-image MMDiT weights sample prompts
(``--prompt``, ``--prompts``), encoded with the local encoders recorded with the weights or given by
``--t5``/``--clip`` and checked against the hashes the training data recorded. ``--geneval FILE`` writes
``--per-prompt`` images of every prompt of a GenEval metadata file in GenEval's folder layout instead, to be
scored in GenEval's own environment (:mod:`tread_scale.sampling.geneval`).
"""

from __future__ import annotations

import argparse
import logging

from tread_scale.cli.common import add_encoder_args, add_guidance_args, guidance_from_args

NAME = "sample"
log = logging.getLogger(__name__)

DEFAULT_GRID_MAX = 64  # tread_scale.sampling.DEFAULT_GRID_MAX, without importing torch to build the parser
DEFAULT_PER_PROMPT = 4  # tread_scale.sampling.geneval.GENEVAL_IMAGES_PER_PROMPT (GenEval's protocol)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``sample``."""
    p = sub.add_parser(NAME, help="sample a PNG grid and an .npz from exported EMA weights")
    p.add_argument("weights", help="a .safetensors file written by training (ema/), or a run folder")
    p.add_argument("--out", required=True,
                   help="output folder (grid.png, samples.npz; with --geneval, GenEval's layout)")
    p.add_argument("--num", type=int,
                   help="number of samples, all of them in samples.npz (default: 16, or 4 per prompt)")
    p.add_argument("--grid-max", type=int, default=DEFAULT_GRID_MAX,
                   help=f"at most this many samples in grid.png (default {DEFAULT_GRID_MAX})")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i uses seed + i (--geneval: image k of prompt p uses seed + p * per_prompt + k)")
    p.add_argument("--labels", help="comma-separated labels (default: cycle through the classes); DiT weights")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeatable; sample i uses prompt i mod n); text-to-image (MMDiT) weights")
    p.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one a line (after any --prompt)")
    p.add_argument("--geneval", metavar="JSONL",
                   help="GenEval's evaluation_metadata.jsonl: write --per-prompt images of each of its prompts as "
                        "OUT/<p:05d>/metadata.jsonl + samples/<k:04d>.png, for scoring in GenEval's environment; "
                        "text-to-image (MMDiT) weights; resumes a folder it wrote (instead of --prompt/--prompts)")
    p.add_argument("--per-prompt", type=int,
                   help=f"--geneval: images per prompt (default {DEFAULT_PER_PROMPT}, GenEval's protocol)")
    add_encoder_args(p)
    add_guidance_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Sample on every rank of the launched process group (if any); rank 0 writes the files."""
    from tread_scale.parallel.process_group import launched_process_group
    from tread_scale.errors import ConfigError
    from tread_scale.sampling import read_prompt_file, sample_to_folder

    if args.geneval:
        return _run_geneval(args)
    if args.per_prompt is not None:
        raise ConfigError("--per-prompt goes with --geneval (images per prompt of a GenEval metadata file); with "
                          "--prompt/--prompts, --num samples cycle through the prompts")
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


def _run_geneval(args: argparse.Namespace) -> int:
    """``sample --geneval``: GenEval's folder layout (rank 0 writes)."""
    from tread_scale.errors import ConfigError
    from tread_scale.parallel.process_group import launched_process_group
    from tread_scale.sampling.geneval import sample_geneval

    clash = [flag for flag, given in (("--prompt", args.prompt), ("--prompts", args.prompts),
                                      ("--labels", args.labels), ("--num", args.num is not None)) if given]
    if clash:
        raise ConfigError(f"--geneval takes its prompts from the metadata file and makes --per-prompt images of each; "
                          f"leave out {', '.join(clash)}")
    if args.grid_max != DEFAULT_GRID_MAX:
        log.warning("--grid-max does not apply to --geneval (no grid is written)")
    per_prompt = args.per_prompt if args.per_prompt is not None else DEFAULT_PER_PROMPT
    with launched_process_group():
        out = sample_geneval(args.weights, args.geneval, args.out, per_prompt=per_prompt, seed=args.seed, t5=args.t5,
                             clip=args.clip, clip_l=args.clip_l, clip_g=args.clip_g, steps=args.steps,
                             guidance=guidance_from_args(args), vae=args.vae, batch_size=args.batch_size,
                             device=args.device)
    if out:
        log.info("GenEval layout in %s: %d prompts x %d images (%d written now, %d there already); record: %s",
                 args.out, out["prompts"], per_prompt, out["written"], out["skipped"], out["record"])
    return 0
