"""Build and run a Composer ``Trainer`` from a :class:`~tread_scale.config.RunConfig`.

:func:`build_trainer` reads as a table of contents; each part lives in the module that owns it:
run context (:mod:`.run`), data (:mod:`.data`), model and optimizer (:mod:`.model`), algorithms
(:mod:`.tread_algorithm`), callbacks (:mod:`.callbacks`), checkpointing (:mod:`.checkpointing`), backend
(:mod:`.backends`) and loggers (:mod:`.loggers`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tread_scale.config import RunConfig
from tread_scale.log_setup import setup_logging
from tread_scale.parallel.process_group import bounded_barrier

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a finished run put its outputs."""

    run_dir: Path
    checkpoint_folder: str
    batches: int
    ema_weights: Path | None
    sample_grid: Path | None


def build_trainer(cfg: RunConfig):
    """Everything for one run, checked before the first step: data access, shapes, devices, batch split.

    Returns:
        ``(trainer, callbacks)``: the Composer ``Trainer`` and the run's
        :class:`~tread_scale.trainer.callbacks.RunCallbacks` (whose outputs the caller may report).
    """
    from tread_scale.compat.composer import fix_node_signal_file_names
    from tread_scale.trainer.backends import build_backend
    from tread_scale.trainer.callbacks import build_callbacks
    from tread_scale.trainer.checkpointing import build_checkpointing
    from tread_scale.trainer.data import build_dataloader, prepare_data_access
    from tread_scale.trainer.loggers import build_loggers
    from tread_scale.trainer.model import build_model
    from tread_scale.trainer.run import start_run
    from tread_scale.trainer.tread_algorithm import build_algorithms

    fix_node_signal_file_names()
    meta = prepare_data_access(cfg)  # before any collective, so a bad dataset fails fast on every rank
    run = start_run(cfg)
    loader = build_dataloader(cfg, meta, run.batch)
    model, optimizer = build_model(cfg, run.device, meta)
    algorithms = build_algorithms(cfg)
    callbacks = build_callbacks(cfg, run, meta, loader.dataset)
    checkpointing = build_checkpointing(cfg, run.rank)
    backend = build_backend(cfg, run)

    trainer = backend.trainer_cls(
        model=model,
        train_dataloader=loader,
        max_duration=cfg.train.max_duration,
        optimizers=optimizer,
        algorithms=algorithms,
        callbacks=backend.first_callbacks + callbacks.callbacks + checkpointing.callbacks,
        loggers=checkpointing.loggers + build_loggers(cfg),
        run_name=cfg.run_name,
        save_folder=checkpointing.save_folder,
        save_interval=cfg.train.save_interval,
        save_num_checkpoints_to_keep=cfg.train.save_num_checkpoints_to_keep,
        autoresume=cfg.train.autoresume,
        device=run.device,
        precision=run.precision,
        device_train_microbatch_size=run.microbatch,
        seed=cfg.seed,
        deterministic_mode=cfg.train.deterministic,
        progress_bar=cfg.logging.progress_bar,
        log_to_console=not cfg.logging.progress_bar,
        console_log_interval=cfg.logging.console_interval,
        python_log_level=None,
        **backend.trainer_kwargs,
    )
    return trainer, callbacks


def train(cfg: RunConfig) -> TrainResult:
    """Train per ``cfg`` (resuming automatically when a checkpoint of the same run exists).

    The barriers at the start and end are bounded (``train.barrier_timeout``) and name absent ranks.
    """
    from tread_scale.trainer.checkpointing import enospc_in, no_space_error

    setup_logging(cfg.logging.level)
    if cfg.logging.wandb.enabled and cfg.logging.wandb.mode != "online":
        os.environ.setdefault("WANDB_MODE", cfg.logging.wandb.mode)
    trainer, callbacks = build_trainer(cfg)
    bounded_barrier("start of training", cfg.train.barrier_timeout)
    try:
        trainer.fit()
        batches = int(trainer.state.timestamp.batch)
        bounded_barrier("end of training", cfg.train.barrier_timeout)
    except Exception as e:
        # Composer's close() ends with a barrier a failed rank's peers may never reach: after an error only
        # the callbacks and loggers are closed, and the error leaves now.
        trainer.engine.close()
        if enospc_in(e) is None:
            raise
        raise no_space_error(cfg) from None
    trainer.close()
    return TrainResult(cfg.run_dir, cfg.checkpoint_folder(), batches, callbacks.export.last_export,
                       callbacks.grid.last_grid)
