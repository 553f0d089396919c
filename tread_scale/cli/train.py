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
    """Train (resuming automatically); logs where the outputs are.

    Returns:
        0 when the run completed ``train.max_duration``; :data:`~tread_scale.cluster.exit_codes.EXIT_STOPPED`
        (75) when it stopped earlier after a checkpoint (rerun to resume). Errors: see
        :mod:`tread_scale.cluster.exit_codes`.
    """
    from tread_scale.cluster.exit_codes import EXIT_OK, EXIT_STOPPED
    from tread_scale.config import load_config
    from tread_scale.trainer.builder import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, owns_process=getattr(args, "owns_process", False))
    if not result.completed:
        of = f" of {result.max_batches}" if result.max_batches is not None else f" (max_duration {cfg.train.max_duration})"
        log.warning("stopped at batch %d%s by %s; checkpoint saved in %s; rerun the same command to resume "
                    "(exit code %d)", result.batches, of, result.stopped_by, result.checkpoint_folder, EXIT_STOPPED)
        return EXIT_STOPPED
    log.info("finished %d batches; run folder %s; checkpoints %s; EMA weights %s; samples %s", result.batches,
             result.run_dir, result.checkpoint_folder, result.ema_weights, result.sample_grid)
    return EXIT_OK
