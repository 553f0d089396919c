"""``EMAExport``: write the EMA weights as safetensors whenever a checkpoint is saved."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from tread_scale.data import object_store as s3
from tread_scale.files import replace_atomically
from tread_scale.trainer.callbacks.ema import EMA
from tread_scale.trainer.callbacks.net_copy import save_weights_to_sample
from tread_scale.weights import WeightsMeta

log = logging.getLogger(__name__)


class EMAExport(Callback):
    """Export ``ema/ba<N>.safetensors`` and ``ema/latest.safetensors`` at the checkpoint cadence.

    The files hold the EMA weights (raw weights if EMA is off) and, as metadata, everything needed to
    rebuild and sample the network without the training code's pickles. They are gathered one tensor at a
    time onto rank 0, which writes each as it arrives (:func:`~.net_copy.save_weights_to_sample`): no rank
    holds the full model for an export.

    Args:
        ema: The EMA callback, or ``None``.
        out_dir: Local folder.
        interval: Checkpoint interval (e.g. ``5000ba``); also at the end of training.
        meta: What the files record to rebuild the network (model, routing, objective, data facts): a
            :class:`~tread_scale.weights.WeightsMeta` (a mapping is parsed into one).
        remote_dir: Also upload there (``s3://…``), if given.
    """

    def __init__(self, ema: EMA | None, out_dir: str | Path, interval: str, meta: WeightsMeta | Mapping[str, Any],
                 remote_dir: str | None = None) -> None:
        self.ema = ema
        self.out_dir = Path(out_dir)
        self.meta = meta if isinstance(meta, WeightsMeta) else WeightsMeta.from_dict(meta, "EMAExport")
        self.remote_dir = remote_dir
        self._due = create_interval_scheduler(interval)
        self.last_export: Path | None = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event in (Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT) and self._due(state, event):
            self.export(state)

    def export(self, state: State) -> Path | None:
        """Write the weights of the current batch now (rank 0 writes; every rank takes part in gathering them).

        Returns:
            The written ``ba<N>.safetensors`` on rank 0, ``None`` elsewhere.
        """
        step = int(state.timestamp.batch)
        rank0 = dist.get_global_rank() == 0
        meta = self.meta.at_step(step, ema=self.ema is not None,
                                 train_wall_s=round(state.timestamp.total_wct.total_seconds(), 3))
        path = save_weights_to_sample(state, self.ema, self.out_dir / f"ba{step:08d}.safetensors" if rank0 else None,
                                      meta)
        if not rank0:
            return None
        latest = self.out_dir / "latest.safetensors"
        shutil.copyfile(path, latest.with_name("latest.safetensors.tmp"))
        replace_atomically(latest.with_name("latest.safetensors.tmp"), latest)
        if self.remote_dir:
            s3.upload_file(path, s3.join_uri(self.remote_dir, path.name))
            s3.upload_file(latest, s3.join_uri(self.remote_dir, latest.name))
        log.info("exported %s weights at batch %d to %s", "EMA" if self.ema else "model", step, path)
        self.last_export = path
        return path
