"""``tread-scale train``: train from a yaml config with ``key=value`` overrides."""

from __future__ import annotations

import argparse
import logging

from tread_scale.cli.common import add_overrides

NAME = "train"
log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train``."""
    p = sub.add_parser(NAME, help="train from a yaml config with key=value overrides", intermixed=True)
    add_overrides(p)
    return p


def run(args: argparse.Namespace) -> int:
    """Train (resuming automatically); logs where the outputs are."""
    from tread_scale.config import load_config
    from tread_scale.trainer.builder import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    log.info("finished %d batches; run folder %s; checkpoints %s; EMA weights %s; samples %s", result.batches,
             result.run_dir, result.checkpoint_folder, result.ema_weights, result.sample_grid)
    return 0
