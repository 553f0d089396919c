"""The ``tread-scale`` command: ``convert``, ``train``, ``sample``, ``dry-run``, ``fid``, ``export``,
``import-dit``, ``import-sd3``, ``plot``."""

from __future__ import annotations

import argparse
import logging
import sys

from tread_scale.cli import convert, dry_run, export, fid, import_dit, import_sd3, plot, sample, train
from tread_scale.cli.common import CommandParser
from tread_scale.errors import TreadScaleError
from tread_scale.log_setup import redact, setup_logging

log = logging.getLogger(__name__)

#: One module per command, in the order of ``--help``; each has ``NAME``, ``add_parser(sub)`` and ``run(args)``.
COMMANDS = (convert, train, sample, dry_run, fid, export, import_dit, import_sd3, plot)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``tread-scale`` and all its commands."""
    parser = argparse.ArgumentParser(prog="tread-scale", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None, *, owns_process: bool | None = None) -> int:
    """Entry point of ``tread-scale``.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
        owns_process: The process exits when this returns (``tread-scale``, ``python -m tread_scale.cli``,
            ``launch.py``): ``train`` then keeps its SIGTERM watchdog armed to the end and bounds the exit
            after a preemption checkpoint. Default: true when ``argv`` is ``None`` (a console entry point),
            false for a call from Python with arguments (tests, notebooks), which go on afterwards.

    Returns:
        The exit code: 0, or 2 for a clear user error (printed as one line,
        ``tread-scale <command>: error: ...``). Usage errors exit 2 through argparse.
    """
    args = build_parser().parse_args(argv)
    args.owns_process = argv is None if owns_process is None else owns_process
    setup_logging(args.log_level)
    runners = {command.NAME: command.run for command in COMMANDS}
    try:
        return runners[args.command](args)
    except TreadScaleError as e:
        # One line on stderr, as argparse reports usage errors; not logged as well, which printed it twice.
        print(redact(f"tread-scale {args.command}: error: {e}"), file=sys.stderr)
        return 2


__all__ = ["main", "build_parser", "COMMANDS"]
