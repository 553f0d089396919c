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
    """Where a run put its outputs, and whether it completed.

    Attributes:
        batches: The batch the run stopped at.
        max_batches: ``train.max_duration`` in batches (``None`` when given in other units).
        stopped_by: What stopped the run before ``max_duration`` (``"SIGTERM"``, ``"the preemption flag file
            …"``), after checkpointing; ``None`` for a run that completed.
    """

    run_dir: Path
    checkpoint_folder: str
    batches: int
    ema_weights: Path | None
    sample_grid: Path | None
    max_batches: int | None = None
    stopped_by: str | None = None

    @property
    def completed(self) -> bool:
        return self.stopped_by is None


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
    callbacks = build_callbacks(cfg, run, meta)
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


def train(cfg: RunConfig, *, owns_process: bool = False) -> TrainResult:
    """Train per ``cfg`` (resuming automatically when a checkpoint of the same run exists).

    Every wait is bounded: the barriers at the start and end (``train.barrier_timeout``, naming absent
    ranks), each batch from the DataLoader workers (:mod:`tread_scale.data.stream.worker_watch`), every other
    collective (``train.collective_timeout``). However training ends, the DataLoader workers (and, when
    ``owns_process``, any other child process started since) are ended within a bound (``SIGKILL`` if need
    be), so nothing on the way out waits on a child that cannot answer. A rank that fails leaves its error for its peers
    (:mod:`tread_scale.parallel.peers`); a rank whose collective fails names the peer that went first.

    Args:
        cfg: The validated config.
        owns_process: The caller exits right after (the CLI): the SIGTERM watchdog then stays armed until
            the process is gone, and after a preemption checkpoint the process must be gone within
            ``train.preemption_grace`` seconds. Leave it ``False`` to go on in the same process (tests).
    """
    from tread_scale.cluster.children import child_pids, end_new_children
    from tread_scale.cluster.exit_codes import EXIT_STOPPED
    from tread_scale.data import object_store as s3
    from tread_scale.trainer.checkpointing import enospc_in, no_space_error

    setup_logging(cfg.logging.level)
    if cfg.logging.wandb.enabled and cfg.logging.wandb.mode != "online":
        os.environ.setdefault("WANDB_MODE", cfg.logging.wandb.mode)
    before = child_pids()  # children that are not ours to end (a test's S3 server, a launcher's helpers)
    trainer, callbacks = build_trainer(cfg)
    loader, watchdog = trainer.state.train_dataloader, callbacks.preemption.watchdog
    try:
        bounded_barrier("start of training", cfg.train.barrier_timeout)
        try:
            trainer.fit()
            batches = int(trainer.state.timestamp.batch)
            _end_workers(loader, "training ended")
            stopped_by = callbacks.preemption.stopped_by
            # After a preemption checkpoint the process has train.preemption_grace s to be gone; an s3://
            # checkpoint counts as saved once Composer's close has uploaded it
            remote = s3.is_s3(cfg.checkpoint_folder())
            if stopped_by is not None and owns_process and not remote:
                watchdog.exit_within(cfg.train.preemption_grace, EXIT_STOPPED,
                                     f"the checkpoint at batch {batches} was saved")
            bounded_barrier("end of training", cfg.train.barrier_timeout)
        except Exception as e:
            _end_workers(loader, "training failed")
            error = _explained(e)
            # Composer's close() ends with a barrier a failed rank's peers may never reach: after an error only
            # the callbacks and loggers are closed, and the error leaves now.
            trainer.engine.close()
            if enospc_in(e) is not None:
                raise no_space_error(cfg) from None
            if error is e:
                raise
            raise error from e
        trainer.close()
        if stopped_by is not None and owns_process and remote:
            watchdog.exit_within(cfg.train.preemption_grace, EXIT_STOPPED,
                                 f"the checkpoint at batch {batches} was saved and uploaded")
    finally:
        if owns_process:  # a library caller's other children (a server a test started meanwhile) are its own
            end_new_children(before, timeout=5.0, why="children of the training run still alive at its end")
        else:
            watchdog.stop()
    return TrainResult(cfg.run_dir, cfg.checkpoint_folder(), batches, callbacks.export.last_export,
                       callbacks.grid.last_grid, _in_batches(cfg.train.max_duration), stopped_by)


def _end_workers(loader, why: str) -> None:
    """End the DataLoader's workers within a bound (before Composer's close, which would join them)."""
    end = getattr(loader, "end_workers", None)
    if end is not None:
        end(3.0, why)


def _explained(error: Exception) -> Exception:
    """Leave this rank's failure for its peers; a failed collective becomes a :class:`PeerFailedError`
    naming the peer that went first (or the error itself, unchanged)."""
    from tread_scale.cluster.diagnostics import whereabouts
    from tread_scale.errors import PeerFailedError, TreadScaleError
    from tread_scale.parallel.peers import peer_report, report_failure

    report_failure(f"{type(error).__name__}: {error}" if not isinstance(error, TreadScaleError) else str(error))
    if isinstance(error, TreadScaleError) or not _is_collective_failure(error):
        return error
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return PeerFailedError(f"a collective failed on {whereabouts()} ({type(error).__name__}: {first}); "
                           f"{peer_report()}")


def _is_collective_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                                  "gloo", "NCCL", "Broken pipe"))


def _in_batches(duration: str) -> int | None:
    """``train.max_duration`` in batches (``None`` in other units), parsed as Composer parses it. (Not the
    trainer state's ``max_duration``: Composer's ``stop_training`` sets that to the batch it stopped at.)"""
    from composer.core import Time, TimeUnit

    parsed = Time.from_timestring(str(duration))
    return int(parsed.value) if parsed.unit == TimeUnit.BATCH else None
