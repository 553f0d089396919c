"""How to sample: the objective's sampler, its step count, guidance and EDM's σ_data."""

from __future__ import annotations

from dataclasses import dataclass

from tread_scale.diffusion.edm import EDM
from tread_scale.diffusion.guidance import Guidance

#: Sampler steps when none are given: EDM-Heun (as EDM's ImageNet setting) and rectified-flow Euler.
DEFAULT_STEPS = {"edm": 40, "rf": 50}


def default_steps(objective: str) -> int:
    """The default number of sampler steps of ``objective`` (``edm``: 40 Heun steps, ``rf``: 50 Euler steps)."""
    return DEFAULT_STEPS.get(objective, DEFAULT_STEPS["rf"])


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample: the objective's sampler, its step count, classifier-free guidance and EDM's σ_data.

    Args:
        objective: ``edm`` (Heun) or ``rf`` (Euler).
        steps: Sampler steps.
        cfg_scale: Classifier-free guidance scale (1 = none).
        sigma_data: σ_data of the EDM objective.
        shift: The rectified-flow timestep shift the model was trained with (``objective.shift``).
    """

    objective: str
    steps: int
    cfg_scale: float = 1.0
    sigma_data: float = 0.5
    shift: float = 1.0

    def guidance(self) -> Guidance:
        """The guidance of these settings (classifier-free only)."""
        return Guidance(cfg_scale=self.cfg_scale)

    def edm(self) -> EDM:
        """EDM's preconditioning constants with this σ_data."""
        return EDM(sigma_data=self.sigma_data)
