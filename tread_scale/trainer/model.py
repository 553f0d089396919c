"""ComposerModel adapter: a DiT plus a diffusion objective."""

from __future__ import annotations

from typing import Any

import torch
from composer.models import ComposerModel

from tread_scale.diffusion.edm import EDM
from tread_scale.diffusion.rectified_flow import RectifiedFlow
from tread_scale.models.dit import DiT
from tread_scale.rng import SeedStream


class DiffusionModel(ComposerModel):
    """Trains ``net`` with ``objective`` on batches ``{"latent", "label"}``.

    ``forward`` returns the scalar stochastic loss of the batch; ``loss`` passes it through. Noise levels,
    noise and label dropout of forward call ``i`` come from a generator seeded ``mix(seed, rank, i)``
    (:class:`~tread_scale.rng.SeedStream`), so each rank has its own stream and a resumed run draws exactly
    what an uninterrupted one would (:class:`~tread_scale.trainer.noise_stream.NoiseStreamState` saves it).

    Args:
        net: The DiT.
        objective: :class:`EDM` or :class:`RectifiedFlow`.
        seed: Base seed of the noise stream.
        rank: Data-parallel rank.
    """

    def __init__(self, net: DiT, objective: EDM | RectifiedFlow, seed: int = 0, rank: int = 0) -> None:
        super().__init__()
        self.net = net
        self.objective = objective
        self.noise = SeedStream(seed, rank)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["latent"].float()
        gen = self.noise.next_generator(x.device)
        return self.objective.training_loss(self.net, x, batch["label"], self.net.null_label, generator=gen)

    def loss(self, outputs: torch.Tensor, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return outputs

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Any | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return {}
