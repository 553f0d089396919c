"""``tread-scale plot``: training loss, validation loss, FID and CLIP score of runs against steps, training
wall-clock and training FLOPs (PNG); ``--target`` prints when each run reached a value, dense vs TREAD."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tread_scale.errors import ConfigError

NAME = "plot"
log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``plot``."""
    p = sub.add_parser(NAME, help="loss, validation loss, FID and CLIP score of runs against steps, wall-clock "
                                  "and FLOPs (PNG); time to a target, dense vs TREAD")
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>: metrics.jsonl, eval.jsonl, fid_curve.jsonl) "
                                           "or FID curve .jsonl files written by tread-scale fid --every")
    p.add_argument("--out", help="output .png (optional with --target)")
    p.add_argument("--target", action="append", default=[], metavar="METRIC=VALUE",
                   help="print, for every run, the first step at which METRIC (val_loss, loss, fid: lower is "
                        "better; clip_score: higher is better) reaches VALUE, with its training wall-clock and "
                        "FLOPs and the TREAD/dense ratios; drawn as a line on the plot; repeatable")
    p.add_argument("--json", action="store_true",
                   help="with --target: print one JSON line per target and run instead of the table")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the plot and print the time to each target."""
    from tread_scale.plot import Target, format_targets, load_series, plot_series, time_to_target

    targets = [Target.parse(t) for t in args.target]
    if not args.out and not targets:
        raise ConfigError("nothing to do: give --out FILE.png and/or --target METRIC=VALUE")
    if args.json and not targets:
        raise ConfigError("--json prints the --target results: give --target METRIC=VALUE")
    series = [load_series(r) for r in args.runs]
    if args.out:
        log.info("wrote %s", plot_series(series, args.out, targets))
    if targets:
        results = time_to_target(series, targets)
        if args.json:
            sys.stdout.write("".join(json.dumps(r.to_dict()) + "\n" for r in results))
        else:
            sys.stdout.write(format_targets(results))
    return 0
