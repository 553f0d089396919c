"""EDM (Karras et al. 2022) preconditioning, loss and Heun sampler, as used by TREAD (spec §4.1, §5.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tread_scale.diffusion.conditioning import drop_condition
from tread_scale.rng import BatchRandom


class EDM:
    """EDM training objective with the reference hyperparameters.

    The denoiser is ``D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise, y)`` with
    ``c_skip = σ_d²/(σ²+σ_d²)``, ``c_out = σ·σ_d/√(σ²+σ_d²)``, ``c_in = 1/√(σ²+σ_d²)`` and
    ``c_noise = ln(σ)/4``. Training draws ``ln σ ~ N(P_mean, P_std²)`` and minimises
    ``λ(σ)·‖D − x‖²`` with ``λ = (σ²+σ_d²)/(σ·σ_d)²``, averaged over every element.

    Args:
        P_mean: Mean of ln σ during training.
        P_std: Standard deviation of ln σ during training.
        sigma_data: Data standard deviation σ_d.
        label_dropout: Probability of replacing a label by the null label during training (CFG).
    """

    name = "edm"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, label_dropout: float = 0.1):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.label_dropout = label_dropout

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma``."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """``λ(σ) = (σ² + σ_d²) / (σ·σ_d)²``."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def model_input(self, x_noisy: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input ``(c_in·x, c_noise)`` for a noisy latent at per-sample ``sigma`` (B,)."""
        _, _, c_in, c_noise = self.preconditioning(sigma)
        return x_noisy * c_in.view(-1, 1, 1, 1), c_noise

    def denoised(self, x_noisy: torch.Tensor, sigma: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """Combine the raw network output ``F`` into ``D(x; σ)``."""
        c_skip, c_out, _, _ = self.preconditioning(sigma)
        return c_skip.view(-1, 1, 1, 1) * x_noisy + c_out.view(-1, 1, 1, 1) * raw.to(x_noisy.dtype)

    def training_loss(self, net: nn.Module, x: torch.Tensor, labels: Any, null_label: Any,
                      generator: torch.Generator | None = None, sample_seeds: list[int] | None = None
                      ) -> torch.Tensor:
        """One stochastic EDM loss on a batch of clean latents.

        Args:
            net: Maps ``(c_in·x, c_noise, y)`` to F.
            x: ``(B, C, H, W)`` clean latents (float32).
            labels: ``(B,)`` int labels, or a condition object (text models).
            null_label: Index that replaces dropped labels, or the batch-1 null condition (empty prompt).
            generator: Source of σ, noise and label dropout (the global RNG when ``None``).
            sample_seeds: One seed per sample instead (see :func:`tread_scale.rng.sample_seeds`).

        Returns:
            Scalar loss.
        """
        rnd = BatchRandom(x.shape[0], x.device, generator, sample_seeds)
        sigma = (rnd.normal() * self.P_std + self.P_mean).exp()
        noise = rnd.normal(*x.shape[1:]).to(x.dtype)
        labels = drop_labels(labels, self.label_dropout, null_label, rnd)
        x_noisy = x + sigma.view(-1, 1, 1, 1) * noise
        net_in, c_noise = self.model_input(x_noisy, sigma)
        denoised = self.denoised(x_noisy, sigma, net(net_in, c_noise, labels).float())
        weight = self.loss_weight(sigma).view(-1, 1, 1, 1)
        return (weight * (denoised - x) ** 2).mean()

    def loss_at(self, net: nn.Module, x: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """Deterministic per-sample loss at given ``sigma`` (B,) and ``noise`` (no label dropout)."""
        x_noisy = x + sigma.view(-1, 1, 1, 1) * noise
        net_in, c_noise = self.model_input(x_noisy, sigma)
        denoised = self.denoised(x_noisy, sigma, net(net_in, c_noise, labels).float())
        return (self.loss_weight(sigma).view(-1, 1, 1, 1) * (denoised - x) ** 2).flatten(1).mean(1)


def drop_labels(labels: Any, prob: float, null_label: Any, rnd: BatchRandom | None = None) -> Any:
    """Replace each sample's condition by the null one with probability ``prob`` (CFG training).

    Args:
        labels: ``(B,)`` labels, or a condition object (see :mod:`tread_scale.diffusion.conditioning`).
        prob: Dropout probability.
        null_label: The null label, or the batch-1 null condition (the empty prompt).
        rnd: Source of the draws (the global RNG when ``None``).
    """
    if prob <= 0:
        return labels
    rnd = rnd or BatchRandom(len(labels), labels.device if torch.is_tensor(labels) else getattr(labels, "device", "cpu"))
    return drop_condition(labels, rnd.uniform() < prob, null_label)


def edm_sigma_steps(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Karras noise levels ``t_0 > … > t_{N-1}`` followed by ``t_N = 0`` (float64)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


@torch.no_grad()
def edm_heun_sample(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_steps: int = 40,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """Deterministic EDM Heun sampler (no churn), NFE = 2N − 1.

    Args:
        denoise: ``D(x, σ)`` for a batch ``x`` (float64) at scalar σ (float64 tensor); returns float64.
        noise: ``(B, C, H, W)`` standard normal noise.
        num_steps: N.
        sigma_min: Smallest σ.
        sigma_max: Largest σ.
        rho: Karras schedule exponent.

    Returns:
        ``(B, C, H, W)`` float64 samples.
    """
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device=noise.device)
    x_next = noise.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = (x_cur - denoise(x_cur, t_cur)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
