"""Loggers of a run: wandb (working with ``mode: offline`` and no API key), with secrets redacted."""

from __future__ import annotations

import os

import yaml

from composer.loggers import WandBLogger


class OfflineSafeWandBLogger(WandBLogger):
    """Composer's WandBLogger, except that it never asks the wandb API for files when offline.

    Composer's autoresume asks every logger for a remote checkpoint; the stock logger calls the wandb API,
    which fails at start ("No API key configured") in offline or disabled mode.

    Args:
        mode: ``online``, ``offline`` or ``disabled``.
        **kwargs: Passed to ``WandBLogger``.
    """

    def __init__(self, mode: str = "online", **kwargs) -> None:
        init_kwargs = dict(kwargs.pop("init_kwargs", None) or {})
        init_kwargs.setdefault("mode", mode)
        super().__init__(init_kwargs=init_kwargs, **kwargs)
        self.mode = mode

    def download_file(self, remote_file_name: str, destination: str, overwrite: bool = False,
                      progress_bar: bool = True) -> None:
        if self.mode != "online" or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
            raise FileNotFoundError(f"wandb is {self.mode}: no remote file {remote_file_name}")
        return super().download_file(remote_file_name, destination, overwrite, progress_bar)


def redacted_config(cfg) -> dict:
    """The config as a plain dict with secret environment values replaced by ``REDACTED`` (for loggers)."""
    from tread_scale.config import dump_config
    from tread_scale.log_setup import redact

    return yaml.safe_load(redact(dump_config(cfg)))


def build_loggers(cfg) -> list:
    """The run's experiment loggers (wandb when ``logging.wandb.enabled``); nothing secret reaches them."""
    from tread_scale.log_setup import redact

    if not cfg.logging.wandb.enabled:
        return []
    config = redacted_config(cfg)
    w = config["logging"]["wandb"]
    return [OfflineSafeWandBLogger(mode=w["mode"], project=w["project"], entity=w["entity"], group=w["group"],
                                   name=redact(cfg.run_name), tags=list(w["tags"]),
                                   init_kwargs={"config": config, "dir": str(cfg.run_dir)})]
