"""Rectified flow (spec §5.3): ``z_t = (1−t)·x + t·ε``, the network predicts ``v = ε − x``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from tread_scale.diffusion.edm import drop_labels
from tread_scale.rng import BatchRandom


class RectifiedFlow:
    """Rectified-flow training objective.

    Args:
        t_sampling: ``logit_normal`` (t = sigmoid(n), n ~ N(0, 1), the reference default) or ``uniform``.
        label_dropout: Probability of replacing a label by the null label during training.
        shift: SD3's timestep shift ``a`` (:func:`shift_time`), applied to every drawn ``t``; 1 is none.
    """

    name = "rf"

    def __init__(self, t_sampling: Literal["logit_normal", "uniform"] = "logit_normal", label_dropout: float = 0.1,
                 shift: float = 1.0):
        if t_sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"t_sampling must be 'logit_normal' or 'uniform', got {t_sampling!r}")
        if not shift > 0:
            raise ValueError(f"shift must be positive, got {shift}")
        self.t_sampling = t_sampling
        self.label_dropout = label_dropout
        self.shift = float(shift)

    def sample_t(self, rnd: BatchRandom) -> torch.Tensor:
        t = rnd.uniform() if self.t_sampling == "uniform" else torch.sigmoid(rnd.normal())
        return shift_time(t, self.shift)

    def training_loss(self, net: nn.Module, x: torch.Tensor, labels: Any, null_label: Any,
                      generator: torch.Generator | None = None, sample_seeds: list[int] | None = None
                      ) -> torch.Tensor:
        """Mean of ``(ε − x − v)²`` over every element.

        Randomness comes from ``generator``, or one generator per sample seeded from ``sample_seeds``, or
        else the global RNG.
        """
        rnd = BatchRandom(x.shape[0], x.device, generator, sample_seeds)
        t = self.sample_t(rnd)
        noise = rnd.normal(*x.shape[1:]).to(x.dtype)
        labels = drop_labels(labels, self.label_dropout, null_label, rnd)
        z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        v = net(z, t, labels).float()
        return ((noise - x - v) ** 2).mean()

    def loss_at(self, net: nn.Module, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """Deterministic per-sample loss at given ``t`` (B,) and ``noise``."""
        z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
        v = net(z, t, labels).float()
        return ((noise - x - v) ** 2).flatten(1).mean(1)


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3's resolution-dependent timestep shift (SD3 paper §5.3.2, eq. 23): ``a·t / (1 + (a − 1)·t)``.

    Maps [0, 1] onto itself, monotonically; ``a > 1`` moves times towards 1 (more noise), which larger
    images need since more tokens keep more signal at a given noise level. ``a = 1`` returns ``t`` itself.
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def rf_euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int = 50,
    shift: float = 1.0,
) -> torch.Tensor:
    """Euler integration from t = 1 to 0 over the grid ``t_i = shift_time(i/N)``, i = N … 0:
    ``z ← z + (t_{i−1} − t_i)·v(z, t_i)`` (with ``shift`` 1: ``z ← z − (1/N)·v`` at t = 1, (N−1)/N, …, 1/N).

    Args:
        velocity: ``v(z, t)`` for a batch ``z`` at scalar ``t`` (float32 tensor).
        noise: ``(B, C, H, W)`` standard normal noise (z at t = 1).
        num_steps: N.
        shift: The timestep shift the model was trained with (:func:`shift_time`).

    Returns:
        ``(B, C, H, W)`` samples (float32).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    z = noise.to(torch.float32)
    if shift == 1.0:
        dt = 1.0 / num_steps
        for i in range(num_steps, 0, -1):
            t = torch.tensor(i / num_steps, device=z.device, dtype=torch.float32)
            z = z - dt * velocity(z, t).float()
        return z
    grid = [float(shift_time(i / num_steps, shift)) for i in range(num_steps + 1)]
    for i in range(num_steps, 0, -1):
        t = torch.tensor(grid[i], device=z.device, dtype=torch.float32)
        z = z + (grid[i - 1] - grid[i]) * velocity(z, t).float()
    return z
