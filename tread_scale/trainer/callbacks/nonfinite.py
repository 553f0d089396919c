"""``NonFiniteLossGuard``: stop cleanly (or skip the update) when the loss becomes NaN or Inf."""

from __future__ import annotations

import logging

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from tread_scale.errors import TreadScaleError

log = logging.getLogger(__name__)


class TrainingDivergedError(TreadScaleError):
    """The loss became NaN or Inf."""


class NonFiniteLossGuard(Callback):
    """Checks every micro-batch's loss; before the optimizer applies the batch, all ranks agree on it.

    Composer runs the micro-batches inside the optimizer's ``step(closure)``, and ``AFTER_TRAIN_BATCH`` fires
    at the end of the closure, i.e. after backward and before any parameter changes. There:

    * ``stop`` raises :class:`TrainingDivergedError` naming the batch: no update, no EMA update and no
      checkpoint of this batch happen, so the newest checkpoint is the last good state;
    * ``skip`` drops the gradients (``grad = None``), which AdamW treats as "no update" (moments and
      weights untouched), logs it, and stops after ``max_skips`` skipped batches in a row.

    Args:
        policy: ``stop`` or ``skip``.
        max_skips: Consecutive skipped batches allowed.
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        self.policy = policy
        self.max_skips = max_skips
        self._bad: torch.Tensor | None = None
        self.skipped = 0
        self.consecutive = 0

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._bad = None

    def after_loss(self, state: State, logger: Logger) -> None:
        loss = state.loss if torch.is_tensor(state.loss) else next(iter(state.loss.values()))
        bad = (~torch.isfinite(loss.detach())).any()
        self._bad = bad if self._bad is None else (self._bad | bad)

    def after_train_batch(self, state: State, logger: Logger) -> None:
        if self._bad is None:
            return
        flag = self._bad.to(torch.int32).reshape(1)
        if dist.get_world_size() > 1:
            dist.all_reduce(flag, reduce_operation="MAX")
        if not bool(flag.item()):
            self.consecutive = 0
            return
        step = int(state.timestamp.batch) + 1
        if self.policy == "skip" and self.consecutive < self.max_skips:
            for p in state.model.parameters():
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
            logger.log_metrics({"train/skipped_batches": self.skipped})
            log.warning("non-finite loss at batch %d: skipped its update (%d in a row, %d in all)", step,
                        self.consecutive, self.skipped)
            return
        why = "" if self.policy == "stop" else f" after {self.consecutive} skipped batches in a row"
        raise TrainingDivergedError(
            f"the loss became NaN/Inf at batch {step}{why}; training stopped before applying it, so the newest "
            "checkpoint is the last good state (lower optimizer.lr, set optimizer.grad_clip_norm, or "
            "train.nonfinite_loss=skip)")
