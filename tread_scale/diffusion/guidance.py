"""Classifier-free guidance and TREAD (sparse) guidance on the raw network output.

Both act on the raw network output F (EDM: before c_skip/c_out, equivalent to guiding D because D is
affine in F; rectified flow: the velocity).

* CFG: ``F = F_u + s_cfg·(F_c − F_u)``, with F_u the dense prediction for the null label.
* TREAD guidance: ``F_tread = F_weak + s_tread·(F_strong − F_weak)``, where strong and weak are the same
  model with routing forced at rates ``γ_strong <= γ_weak``, both drawn from the same routing seed. The
  label is **kept** in both branches by default (the reference drops it, a bug: spec §5.3);
  ``tread_drop_label=True`` restores the reference behaviour.
* Together: ``F = F_u + s_cfg·(F_tread − F_u)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tread_scale.diffusion.conditioning import null_like
from tread_scale.errors import ConfigError
from tread_scale.rng import mix_seed
from tread_scale.routing.routes import check_rate


@dataclass(frozen=True)
class Guidance:
    """Guidance settings for sampling.

    Attributes:
        cfg_scale: CFG scale; 1 disables CFG, 0 gives the unconditional prediction.
        tread_scale: TREAD guidance scale s; ``None`` disables TREAD guidance.
        strong_rate: Routing rate of the strong branch (γ_strong).
        weak_rate: Routing rate of the weak branch (γ_weak >= γ_strong).
        tread_drop_label: Use the null label in both TREAD branches (the reference's behaviour).
        interval: Apply guidance only when the noise level (σ for EDM, t for rectified flow) lies in
            ``[low, high]``; ``None`` guides at every level.
    """

    cfg_scale: float = 1.0
    tread_scale: float | None = None
    strong_rate: float = 0.3
    weak_rate: float = 0.7
    tread_drop_label: bool = False
    interval: tuple[float, float] | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` on inconsistent settings."""
        if self.tread_scale is not None:
            check_rate(self.strong_rate, "guidance.strong_rate")
            check_rate(self.weak_rate, "guidance.weak_rate")
            if self.strong_rate > self.weak_rate:
                raise ConfigError(f"guidance: strong_rate ({self.strong_rate}) must not exceed weak_rate "
                                  f"({self.weak_rate}); the strong branch is the less sparse one")
        if self.interval is not None:
            lo, hi = self.interval
            if not lo <= hi:
                raise ConfigError(f"guidance.interval: low ({lo}) must be <= high ({hi})")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def uses_tread(self) -> bool:
        return self.tread_scale is not None


class GuidedPredictor:
    """Callable ``F(x_in, t_in, y, level)`` that applies :class:`Guidance` around a network.

    Args:
        net: Network called as ``net(x, t, y, force_routing=..., rate_override=..., routing_seed=...)``.
        guidance: Settings.
        null_label: Label index of the unconditional branch, or the batch-1 null condition (empty prompt).
        seed: Base seed of the routing subsets drawn for TREAD guidance (one per call, shared by both
            branches), or one seed per sample so that results do not depend on how samples are batched.
    """

    def __init__(self, net: nn.Module, guidance: Guidance, null_label: Any, seed: int | list[int] = 0) -> None:
        guidance.validate()
        if guidance.uses_tread and getattr(net, "router", None) is None:
            raise ConfigError("TREAD guidance needs a model with routes attached (the routes it was trained with); "
                              "set routing.routes or disable guidance.tread_scale")
        self.net = net
        self.guidance = guidance
        self.null_label = null_label
        self.seed = seed
        self.calls = 0

    def _conditional(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = self.guidance
        if not g.uses_tread:
            return self.net(x, t, y)
        if isinstance(self.seed, int):
            seed: int | list[int] = mix_seed(self.seed, self.calls)
        else:
            seed = [mix_seed(s, self.calls) for s in self.seed]
        y_t = null_like(y, self.null_label) if g.tread_drop_label else y
        strong = self.net(x, t, y_t, force_routing=True, rate_override=g.strong_rate, routing_seed=seed)
        weak = self.net(x, t, y_t, force_routing=True, rate_override=g.weak_rate, routing_seed=seed)
        return weak + g.tread_scale * (strong - weak)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, level: float) -> torch.Tensor:
        g = self.guidance
        self.calls += 1
        if g.interval is not None and not g.interval[0] <= level <= g.interval[1]:
            return self.net(x, t, y)
        out = self._conditional(x, t, y)
        if g.uses_cfg:
            uncond = self.net(x, t, null_like(y, self.null_label))
            out = uncond + g.cfg_scale * (out - uncond)
        return out
