"""``tread-scale sample``: a PNG grid and an ``.npz`` of samples from exported EMA weights.

Class-conditional DiT weights sample labels (``--labels``); text-to-image MMDiT weights sample prompts
(``--prompt``, ``--prompts``), encoded with the local encoders recorded with the weights or given by
``--t5``/``--clip`` and checked against the hashes the training data recorded. ``--geneval FILE`` writes
``--per-prompt`` images of every prompt of a GenEval metadata file in GenEval's folder layout instead, to be
scored in GenEval's own environment (:mod:`tread_scale.sampling.geneval`). ``--sweep SPEC`` (repeatable) samples
the same seeds and prompts/labels once per guidance setting into ``OUT/<i>-<slug>/`` and writes ``OUT/sweep.jsonl``,
a line per setting with its sampling FLOPs per image (counted from the network calls) and their ratio to the first's.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from tread_scale.cli.common import add_encoder_args, add_guidance_args, guidance_from_args, parse_guidance_spec

NAME = "sample"
log = logging.getLogger(__name__)

DEFAULT_GRID_MAX = 64  # tread_scale.sampling.DEFAULT_GRID_MAX, without importing torch to build the parser
DEFAULT_PER_PROMPT = 4  # tread_scale.sampling.geneval.GENEVAL_IMAGES_PER_PROMPT (GenEval's protocol)
SWEEP_FILE = "sweep.jsonl"


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
    p.add_argument("--size", metavar="WxH", action="append",
                   help="image size in pixels to sample at, e.g. one of the training data's aspect-ratio buckets "
                        "(default: the weights' configured square); repeatable: OUT/<WxH>/ per size, the same seeds, "
                        "and OUT/grid.png with a row per size")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeatable; sample i uses prompt i mod n); text-to-image (MMDiT) weights")
    p.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one a line (after any --prompt)")
    p.add_argument("--geneval", metavar="JSONL",
                   help="GenEval's evaluation_metadata.jsonl: write --per-prompt images of each of its prompts as "
                        "OUT/<p:05d>/metadata.jsonl + samples/<k:04d>.png, for scoring in GenEval's environment; "
                        "text-to-image (MMDiT) weights; resumes a folder it wrote (instead of --prompt/--prompts)")
    p.add_argument("--per-prompt", type=int,
                   help=f"--geneval: images per prompt (default {DEFAULT_PER_PROMPT}, GenEval's protocol)")
    p.add_argument("--sweep", action="append", metavar="SPEC",
                   help="a guidance setting (repeatable: a sweep): sample the same seeds and prompts/labels once per "
                        "setting into OUT/<i>-<setting>/ and write OUT/sweep.jsonl with each setting's sampling FLOPs "
                        "per image; SPEC is KEY=VALUE[,...] with KEY in cfg, tread, strong, weak, interval (LOW:HIGH), "
                        "drop_label, replacing the guidance options, e.g. --sweep cfg=1 --sweep cfg=3,tread=1.3")
    add_encoder_args(p)
    add_guidance_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Sample on every rank of the launched process group (if any); rank 0 writes the files."""
    from tread_scale.parallel.process_group import launched_process_group
    from tread_scale.errors import ConfigError
    from tread_scale.sampling import read_prompt_file, sample_to_folder

    if args.sweep and args.geneval:
        raise ConfigError("--sweep samples a grid per guidance setting; it does not combine with --geneval (run "
                          "sample --geneval once per setting, each with its own --out)")
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
    if args.sweep:
        if args.size and len(args.size) > 1:
            raise ConfigError("--sweep samples one size; give at most one --size")
        return _run_sweep(args, labels, prompts or None)
    if args.size and len(args.size) > 1:
        return _run_sizes(args, labels, prompts or None)
    with launched_process_group():
        out = sample_to_folder(args.weights, args.out, num=args.num, seed=args.seed, labels=labels,
                               prompts=prompts or None, t5=args.t5, clip=args.clip, clip_l=args.clip_l,
                               clip_g=args.clip_g, steps=args.steps,
                               guidance=guidance_from_args(args), vae=args.vae, batch_size=args.batch_size,
                               device=args.device, grid_max=args.grid_max, size=(args.size or [None])[0])
    if out:
        log.info("wrote %s", ", ".join(str(v) for v in out.values()))
    return 0


def _run_sizes(args: argparse.Namespace, labels: list[int] | None, prompts: list[str] | None) -> int:
    """``--size`` given more than once: the same seeds and prompts/labels at each size into ``OUT/<WxH>/``, and
    ``OUT/grid.png`` with one row per size (the first ``--grid-max`` of each, at most 8)."""
    import numpy as np

    from tread_scale.imaging import mixed_size_grid, save_png
    from tread_scale.parallel.process_group import launched_process_group
    from tread_scale.sampling import sample_to_folder

    out, rows = Path(args.out), []
    with launched_process_group():
        for size in args.size:
            written = sample_to_folder(args.weights, str(out / size), num=args.num, seed=args.seed, labels=labels,
                                       prompts=prompts, t5=args.t5, clip=args.clip, clip_l=args.clip_l,
                                       clip_g=args.clip_g, steps=args.steps, guidance=guidance_from_args(args),
                                       vae=args.vae, batch_size=args.batch_size, device=args.device,
                                       grid_max=args.grid_max, size=size)
            if written:  # rank 0
                with np.load(written["npz"]) as z:
                    rows.append(z["images"][:min(args.grid_max, 8)])
    if rows:
        grid = save_png(out / "grid.png", mixed_size_grid(rows))
        log.info("wrote %s (a row per size: %s) and a folder per size", grid, ", ".join(args.size))
    return 0


def sweep_folder(i: int, spec: str) -> str:
    """The folder name of setting ``i`` of a sweep: ``<i>-<spec with each run of other characters than letters,
    digits and dots as one dash>``, e.g. ``1-cfg-1.5-interval-0.1-0.9``."""
    return f"{i}-{re.sub(r'[^A-Za-z0-9.]+', '-', spec).strip('-') or 'base'}"


def _run_sweep(args: argparse.Namespace, labels: list[int] | None, prompts: list[str] | None) -> int:
    """``sample --sweep``: the same samples under each guidance setting, a folder each, and ``sweep.jsonl`` with
    the sampling FLOPs per image of each (rank 0 writes). Every spec is checked before anything is sampled."""
    import dataclasses

    from tread_scale.errors import ConfigError
    from tread_scale.parallel.process_group import launched_process_group
    from tread_scale.sampling import sample_to_folder
    from tread_scale.weights import read_meta, resolve_weights

    settings = [parse_guidance_spec(spec, guidance_from_args(args)) for spec in args.sweep]
    tread = [spec for spec, g in zip(args.sweep, settings) if g.uses_tread]
    path = resolve_weights(args.weights)
    if tread and not read_meta(path).routing_config().routes:
        raise ConfigError(f"--sweep {tread[0]!r}: TREAD guidance needs weights trained with routes; {path} records "
                          "none (a dense model); leave tread= out of the sweep")
    out = Path(args.out)
    records: list[dict] = []
    with launched_process_group():
        for i, (spec, guidance) in enumerate(zip(args.sweep, settings)):
            folder = out / sweep_folder(i, spec)
            written = sample_to_folder(str(path), str(folder), num=args.num, seed=args.seed, labels=labels,
                                       prompts=prompts, t5=args.t5, clip=args.clip, clip_l=args.clip_l,
                                       clip_g=args.clip_g, steps=args.steps, guidance=guidance, vae=args.vae,
                                       batch_size=args.batch_size, device=args.device, grid_max=args.grid_max,
                                       count_flops=True, size=(args.size or [None])[0])
            if not written:  # ranks other than 0 write nothing
                continue
            flops = written["sampling_flops_per_image"]
            first = records[0]["sampling_flops_per_image"] if records else flops
            records.append({"sweep": spec, "guidance": dataclasses.asdict(guidance), "folder": str(folder),
                            "sampling_flops_per_image": flops, "flops_vs_first": flops / first})
            (out / SWEEP_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
            log.info("sweep %d/%d %-40s -> %s  sampling %.3g GFLOP/image (x%.3f of the first)", i + 1,
                     len(settings), spec, folder, flops / 1e9, records[-1]["flops_vs_first"])
    if records:
        log.info("wrote %s", out / SWEEP_FILE)
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
