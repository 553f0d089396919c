"""``TrainStep``: tells the model which optimizer step it is computing."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger

from tread_scale.trainer.utils import unwrap


class TrainStep(Callback):
    """Before each training batch, set ``model.step`` to the batch count (restored by Composer on resume).

    :class:`~tread_scale.trainer.model.DiffusionModel` seeds every sample's draws with it.
    """

    def before_train_batch(self, state: State, logger: Logger) -> None:
        unwrap(state.model).step = int(state.timestamp.batch)
