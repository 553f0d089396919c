"""``tread-scale plot``: loss and FID curves of runs against steps and wall-clock time (PNG)."""

from __future__ import annotations

import argparse
import logging

NAME = "plot"
log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``plot``."""
    p = sub.add_parser(NAME, help="loss and FID curves of runs against steps and wall-clock time (PNG)")
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>; FID from its fid_curve.jsonl, else eval.jsonl) "
                                           "or FID curve .jsonl files written by tread-scale fid --every")
    p.add_argument("--out", required=True, help="output .png")
    return p


def run(args: argparse.Namespace) -> int:
    """Write the plot."""
    from tread_scale.plot import plot_runs

    log.info("wrote %s", plot_runs(args.runs, args.out))
    return 0
