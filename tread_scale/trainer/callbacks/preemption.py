"""``Preemption``: checkpoint and stop cleanly when the cluster is about to take the job away.

Two triggers, checked by every rank at the end of every batch and agreed on with one all-reduce (so all
ranks stop at the same step):

* a signal to a training process (``SIGUSR1``, or ``SIGTERM`` as Slurm sends before killing a job step);
* a flag file, which ``slurm/common.sh`` creates when the *batch script* is signalled
  (``#SBATCH --signal=B:USR1@…`` before the time limit, or ``scancel --signal=USR1 --batch``).

A signal is also heard by a :class:`~tread_scale.cluster.signals.SignalWatchdog` thread: if no batch end
begins the checkpoint within ``grace`` seconds (the rank is stuck in a data wait or a collective), or on a
second SIGTERM, the process dumps its threads and exits non-zero instead of living on as an orphan.

On a trigger the engine checkpoint (DeepSpeed), the Composer checkpoint and the EMA export are written
in that order, training stops, and the caller (the Slurm script) requeues the job, whose autoresume
continues from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from tread_scale.cluster.signals import SignalWatchdog
from tread_scale.compat.composer import save_checkpoint_now

log = logging.getLogger(__name__)


class Preemption(Callback):
    """See the module docstring.

    After checkpointing, rank 0 replaces the flag file by ``PREEMPTED`` beside it (holding the batch), which
    tells the Slurm script to requeue the job.

    Args:
        flag_file: Path whose existence requests a checkpoint-and-stop (``None``: signals only).
        signals: Signals that request it.
        grace: Seconds from a signal to the start of the checkpoint before the process gives up and exits
            (``train.preemption_grace``).
    """

    def __init__(self, flag_file: str | Path | None = None,
                 signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM), grace: float = 30.0) -> None:
        self.flag_file = Path(flag_file) if flag_file else None
        self.signals = signals
        self.requested = False
        self.triggered_at: int | None = None
        self.stopped_by: str | None = None  # what stopped the run, once it stopped
        self._heard: str | None = None
        self.watchdog = SignalWatchdog(signals, grace)

    def init(self, state: State, logger: Logger) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            signal.signal(sig, self._on_signal)
        self.watchdog.start()

    # No close(): the watchdog outlives Composer's close, so SIGTERM stays bounded on the way out (issue 20);
    # whoever runs the trainer stops it (tread_scale.trainer.builder.train) or lets the process end with it.

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        self._heard = self._heard or signal.Signals(signum).name

    def _agreed(self, state: State) -> bool:
        flagged = self.flag_file is not None and self.flag_file.exists()
        if flagged and self._heard is None:
            self._heard = f"the preemption flag file {self.flag_file}"
        local = self.requested or flagged
        if dist.get_world_size() == 1:
            return local
        flag = state.device.tensor_to_device(torch.tensor([int(local)], dtype=torch.int32))
        dist.all_reduce(flag, reduce_operation="MAX")
        return bool(flag.item())

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.triggered_at is not None or not self._agreed(state):
            return
        step = int(state.timestamp.batch)
        self.triggered_at = step
        self.stopped_by = self._heard or "a preemption request on another rank"
        self.watchdog.acknowledge()
        log.warning("preemption requested: checkpointing at batch %d and stopping", step)
        from composer.callbacks import CheckpointSaver

        from tread_scale.trainer.backends.deepspeed import DeepSpeedCheckpoint
        from tread_scale.trainer.callbacks.ema_export import EMAExport

        callbacks = list(state.callbacks)
        for cb in callbacks:
            if isinstance(cb, DeepSpeedCheckpoint):
                cb.save(state)
        for cb in callbacks:
            if isinstance(cb, CheckpointSaver):
                save_checkpoint_now(cb, state, logger)
        for cb in callbacks:
            if isinstance(cb, EMAExport):
                cb.export(state)
        state.stop_training()
        if self.flag_file is not None and dist.get_global_rank() == 0:
            (self.flag_file.parent / "PREEMPTED").write_text(f"{step}\n")
            self.flag_file.unlink(missing_ok=True)
