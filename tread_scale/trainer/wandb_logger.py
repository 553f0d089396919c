"""A WandBLogger that works with ``mode: offline`` and no API key."""

from __future__ import annotations

import os

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
