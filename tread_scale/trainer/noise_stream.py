"""``NoiseStreamState``: checkpoints the position of the training noise stream."""

from __future__ import annotations

from typing import Any

from composer.core import Callback

from tread_scale.rng import SeedStream


class NoiseStreamState(Callback):
    """Saves and restores the :class:`~tread_scale.rng.SeedStream` that draws σ/t, noise and label dropout.

    Every rank advances its stream once per forward, so the position saved by rank 0 is every rank's.

    Args:
        stream: The model's noise stream.
    """

    def __init__(self, stream: SeedStream) -> None:
        self.stream = stream

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state(state)
