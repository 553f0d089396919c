"""FID, sFID, Inception Score and precision/recall from Inception features, with distributed statistics.

Statistics accumulate in float64 as a count, a sum and a sum of outer products, all-reduced across ranks,
so the result does not depend on how samples were split over ranks or batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tread_scale.errors import DatasetError


class FeatureStats:
    """Running ``n``, ``Σx`` and ``Σxxᵀ`` of feature vectors (float64).

    Args:
        dim: Feature width.
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor) -> None:
        f = feats.detach().to("cpu", torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> FeatureStats:
        """Sum the statistics over ranks (no-op outside torch.distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            buf = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.outer.flatten()])
            dist.all_reduce(buf)
            d = self.sum.numel()
            self.n = int(round(buf[0].item()))
            self.sum = buf[1:1 + d].clone()
            self.outer = buf[1 + d:].view(d, d).clone()
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2·(Σ1Σ2)^½)`` (real part; a small ridge if the product is singular)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        eps = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E[KL(p(y|x) ‖ p(y))])`` over ``splits`` chunks: (mean, std)."""
    p = torch.softmax(logits.to(torch.float64), dim=1)
    scores = []
    for chunk in p.chunk(splits):
        py = chunk.mean(0, keepdim=True)
        kl = (chunk * (chunk.clamp_min(1e-12).log() - py.clamp_min(1e-12).log())).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds of pool features."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), chunk):
            d = torch.cdist(x[i:i + chunk], x)
            out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
        return torch.cat(out)

    def coverage(manifold: torch.Tensor, r: torch.Tensor, probes: torch.Tensor) -> float:
        inside = 0
        for i in range(0, len(probes), chunk):
            d = torch.cdist(probes[i:i + chunk], manifold)
            inside += int((d <= r[None]).any(1).sum())
        return inside / len(probes)

    real, fake = real.to(torch.float64), fake.to(torch.float64)
    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


@dataclass
class ReferenceStats:
    """Mean and covariance of reference pool features (ADM's ``VIRTUAL_*.npz`` has ``mu`` and ``sigma``)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None

    def save(self, path: str | Path) -> None:
        extra = {} if self.mu_s is None else {"mu_s": self.mu_s, "sigma_s": self.sigma_s}
        np.savez(path, mu=self.mu, sigma=self.sigma, **extra)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        p = Path(path)
        if not p.is_file():
            raise DatasetError(f"reference statistics {str(p)!r} not found")
        with np.load(p) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise DatasetError(f"{p}: expected arrays 'mu' and 'sigma' (ADM format), found {z.files}")
            return cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64),
                       z["mu_s"] if "mu_s" in z.files else None, z["sigma_s"] if "sigma_s" in z.files else None)
