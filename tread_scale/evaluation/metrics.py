"""FID, sFID, Inception Score and precision/recall from Inception features, as ADM's evaluation suite computes them.

Statistics accumulate in float64 as a count, a sum and a sum of outer products, all-reduced across ranks,
so the result does not depend on how samples were split over ranks or batches.

Each metric follows openai/guided-diffusion ``evaluations/evaluator.py``:

* FID / sFID (:func:`frechet_distance`): ``‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2·sqrtm(Σ1Σ2))`` with scipy's ``sqrtm``;
  a non-finite square root is retried with ``1e-6`` added to both diagonals; an imaginary part of the
  diagonal above ``1e-3`` is an error, a smaller one is dropped.
* Inception Score (:func:`inception_score`): softmax of the unbiased logits, in consecutive splits of 5000
  samples, mean of ``exp(E[KL(p(y|x) ‖ p(y))])`` over the splits.
* Precision/recall (:func:`precision_recall`): Kynkäänniemi et al.'s k-NN manifolds with ``k = 3``, pairwise
  squared distances in float16 as ADM's ``DistanceBlock`` (float32 where a block overflows), in blocks of
  10000 x 10000 as ADM's ``ManifoldEstimator``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tread_scale.errors import DatasetError

log = logging.getLogger(__name__)

IS_SPLIT_SIZE = 5000  # ADM: Evaluator.compute_inception_score(split_size=5000)
PR_NEIGHBOURS = 3  # ADM: ManifoldEstimator(nhood_sizes=(3,))
PR_BATCH_SIZE = 10000  # ADM: ManifoldEstimator(row_batch_size=10000, col_batch_size=10000)
FID_EPS = 1e-6  # ADM: FIDStatistics.frechet_distance(eps=1e-6)


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
        """Add a ``(B, dim)`` batch."""
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
        """Mean and unbiased covariance (``np.cov``'s ``n - 1``), float64."""
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), cov.numpy()


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """Fréchet distance of two Gaussians, as ADM's ``FIDStatistics.frechet_distance``.

    ``‖μ1 − μ2‖² + Tr(Σ1) + Tr(Σ2) − 2·Tr(sqrtm(Σ1Σ2))``. When the square root of the product is not finite
    (a singular product), it is recomputed with ``eps`` added to both diagonals. A complex square root is
    accepted when the imaginary parts of its diagonal are within ``1e-3`` of zero, and its real part used.

    Raises:
        ValueError: If the shapes differ, or the square root has a diagonal imaginary part above ``1e-3``.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different widths: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("FID: the product of the covariances is singular; adding %g to their diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the square root of the covariance product has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g} on its diagonal (above 1e-3)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """Inception Score as ADM computes it: mean and std over consecutive splits of ``split_size`` samples.

    Per split, ``exp(mean_x KL(p(y|x) ‖ p(y)))`` with ``p(y|x) = softmax(logits)`` and ``p(y)`` the split's mean;
    the last split may be shorter and counts like the others. ADM's logits are ``pool_3 @ W`` without the
    bias (``FIDInception``'s ``logits``). Computed in float64 (``0·log 0 = 0``).

    Args:
        logits: ``(N, classes)`` in sample order.
        split_size: Samples per split (ADM: 5000; 50000 samples give 10 splits).

    Returns:
        ``(mean, std)`` over the splits (std is 0 for a single split).
    """
    if len(logits) == 0:
        raise ValueError("the Inception Score needs at least one sample")
    p = torch.softmax(logits.to(torch.float64), dim=1)
    scores = []
    for lo in range(0, len(p), split_size):
        part = p[lo: lo + split_size]
        py = part.mean(0, keepdim=True)
        kl = (torch.special.xlogy(part, part) - part * py.log()).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _round_f16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to float16 precision (overflow → ±inf), kept as float32."""
    return x.half().float()


def _matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with float32 (or TF32: exact on float16 values) inputs, never bfloat16 (``medium`` precision)."""
    previous = torch.get_float32_matmul_precision()
    if previous == "medium":
        torch.set_float32_matmul_precision("high")
    try:
        return a @ b
    finally:
        torch.set_float32_matmul_precision(previous)


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor, fp16: bool = True) -> torch.Tensor:
    """Squared Euclidean distances ``(len(u), len(v))`` as ADM's ``DistanceBlock`` computes them.

    ADM evaluates ``max(‖u‖² − 2·u·vᵀ + ‖v‖², 0)`` in float16 (each op rounded to float16; the matmul and the
    row sums accumulate in float32) and, if any entry of the block is not finite, again in float32. Here
    float16 is emulated in float32 with a rounding after each op: exact for a single op (float32 has more
    than 2·11 + 2 bits, so double rounding is harmless), and tensor cores (TF32) are exact on float16 values.
    The float32 sums may round to float16 differently from ADM's GPU kernels in rare entries (another
    summation order): one float16 step, as between two GPUs running ADM. The float32 fallback is computed in
    float64 and rounded to float32.

    Args:
        u: ``(M, D)`` features.
        v: ``(N, D)`` features.
        fp16: ``False`` skips the float16 pass (plain float32 distances).

    Returns:
        ``(M, N)`` float32.
    """
    if fp16:
        u16, v16 = _round_f16(u.float()), _round_f16(v.float())
        nu = _round_f16(_round_f16(u16 * u16).sum(1))
        nv = _round_f16(_round_f16(v16 * v16).sum(1))
        uv = _round_f16(_matmul_f32(u16, v16.T))
        d = _round_f16(nu[:, None] - _round_f16(2 * uv))
        d = _round_f16(d + nv[None, :]).clamp_min(0)
        if torch.isfinite(d).all():
            return d
    u64, v64 = u.double(), v.double()
    d = (u64 * u64).sum(1)[:, None] - 2 * (u64 @ v64.T) + (v64 * v64).sum(1)[None, :]
    return d.clamp_min(0).float()


def manifold_radii(features: torch.Tensor, k: int = PR_NEIGHBOURS, row_batch_size: int = PR_BATCH_SIZE,
                   col_batch_size: int = PR_BATCH_SIZE, fp16: bool = True) -> torch.Tensor:
    """Squared distance of each feature to its ``k``-th nearest neighbour (itself at rank 0), ADM's way.

    Distances go in blocks of ``row_batch_size`` x ``col_batch_size`` as in ADM's
    ``ManifoldEstimator.manifold_radii`` (which block falls back to float32 depends on them); keeping the
    ``k + 1`` smallest of each row across the column blocks equals ADM's ``np.partition`` of the full row.

    Raises:
        ValueError: If there are not more than ``k`` features.
    """
    n = len(features)
    if n <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} samples per set, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, row_batch_size):
        rows = features[r0: r0 + row_batch_size]
        best = None
        for c0 in range(0, n, col_batch_size):
            d = pairwise_sq_distances(rows, features[c0: c0 + col_batch_size], fp16)
            best = d if best is None else torch.cat([best, d], 1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        radii[r0: r0 + row_batch_size] = best.max(1).values  # the (k+1)-th smallest, counting the point itself
    return radii


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS,
                     row_batch_size: int = PR_BATCH_SIZE, col_batch_size: int = PR_BATCH_SIZE, fp16: bool = True,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's ``compute_prec_recall``.

    Precision: the fraction of ``fake`` inside the real manifold (within the k-NN radius of some real point);
    recall: the fraction of ``real`` inside the fake manifold. Distances are ADM's
    (:func:`pairwise_sq_distances`), blocks are ``row_batch_size`` real x ``col_batch_size`` fake.

    Args:
        real: ``(N1, D)`` reference pool features.
        fake: ``(N2, D)`` sample pool features.
        k: Neighbourhood size (ADM: 3).
        row_batch_size: Rows (real) per distance block (ADM: 10000).
        col_batch_size: Columns (fake) per distance block (ADM: 10000).
        fp16: ADM's float16 distances (``False``: float32).
        device: Where to compute (default: where ``real`` is).

    Returns:
        ``(precision, recall)``.
    """
    device = torch.device(device) if device is not None else real.device
    real, fake = real.to(device, torch.float32), fake.to(device, torch.float32)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature widths differ: real {real.shape[1]}, fake {fake.shape[1]}")
    r_real = manifold_radii(real, k, row_batch_size, col_batch_size, fp16)
    r_fake = manifold_radii(fake, k, row_batch_size, col_batch_size, fp16)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=device)
    for r0 in range(0, len(real), row_batch_size):
        rows = real[r0: r0 + row_batch_size]
        for c0 in range(0, len(fake), col_batch_size):
            d = pairwise_sq_distances(rows, fake[c0: c0 + col_batch_size], fp16)
            real_in[r0: r0 + row_batch_size] |= (d <= r_fake[None, c0: c0 + col_batch_size]).any(1)
            fake_in[c0: c0 + col_batch_size] |= (d <= r_real[r0: r0 + row_batch_size, None]).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())


# What a reference was computed from (``ReferenceStats.source``).
ADM_BATCH = "adm-reference-batch"  # an ADM reference batch .npz (has arr_0): statistics as ADM's suite stored them
IMAGES = "images"  # real images of an image folder, through this pipeline
PIXEL_DATA = "pixel-data"  # real images stored as pixels in an MDS dataset, through this pipeline
VAE_RECONSTRUCTIONS = "vae-reconstructions"  # latents of an MDS dataset decoded by a VAE: not real images
UNKNOWN = "unknown"  # an .npz without provenance
REAL_SOURCES = (ADM_BATCH, IMAGES, PIXEL_DATA)

# Version of the feature definitions written into saved statistics: ADM's TF1 resize and (x - 128) / 128,
# pool_3, and sFID from mixed_6/conv (Mixed_6d.branch1x1), first 7 channels, channels-last.
PIPELINE = "adm-v1"


@dataclass
class ReferenceStats:
    """Reference statistics: pool (``mu``, ``sigma``) and spatial (``mu_s``, ``sigma_s``) means and covariances.

    The ``.npz`` layout is ADM's (``mu``, ``sigma``, ``mu_s``, ``sigma_s``). Files written by :meth:`save` also
    record their provenance (``source``, ``pipeline``, ``inception_sha256``, ``num_images``); ADM's reference
    batches are recognised by their images (``arr_0``).

    Attributes:
        source: What the statistics were computed from (:data:`ADM_BATCH`, :data:`IMAGES`, :data:`PIXEL_DATA`,
            :data:`VAE_RECONSTRUCTIONS` or :data:`UNKNOWN`).
        inception_sha256: SHA-256 of the Inception weights that computed them (``None``: unknown).
        num_images: How many images they summarise (``None``: unknown).
        pipeline: The feature definitions' version (:data:`PIPELINE` for this code, ``None``: unknown).
        path: The file they were read from, if any.
        has_images: Whether the file holds images (``arr_0``), e.g. for precision/recall against them.
    """

    mu: np.ndarray | None
    sigma: np.ndarray | None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    source: str = UNKNOWN
    inception_sha256: str | None = None
    num_images: int | None = None
    pipeline: str | None = PIPELINE
    path: str | None = None
    has_images: bool = False

    def save(self, path: str | Path) -> None:
        """Write ADM's keys plus the provenance (all plain arrays: no pickle needed to read them)."""
        extra = {} if self.mu_s is None else {"mu_s": self.mu_s, "sigma_s": self.sigma_s}
        meta = {"source": np.array(self.source), "pipeline": np.array(self.pipeline or "")}
        if self.inception_sha256:
            meta["inception_sha256"] = np.array(self.inception_sha256)
        if self.num_images is not None:
            meta["num_images"] = np.array(self.num_images)
        np.savez(path, mu=self.mu, sigma=self.sigma, **extra, **meta)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """Read statistics written by :meth:`save`, an ADM reference batch, or any ``.npz`` with ADM's keys.

        An ADM reference batch without ``mu``/``sigma`` loads with ``mu = None``: its statistics must then be
        computed from its images (``tread_scale.evaluation.fid`` does). Spatial statistics written by an
        older pipeline are dropped (their sFID features were defined differently).

        Raises:
            DatasetError: If the file is missing, not an ``.npz``, lacks ``mu``/``sigma`` (and images), or its
                arrays have the wrong shapes.
        """
        p = Path(path)
        if not p.is_file():
            raise DatasetError(f"reference statistics {str(p)!r} not found")
        try:
            z = np.load(p)
        except Exception as e:  # noqa: BLE001 - numpy raises several types for a bad file
            raise DatasetError(f"{p}: not a readable .npz ({type(e).__name__}: {e})") from None
        with z:
            files = set(z.files)
            has_images = "arr_0" in files
            if ("mu" not in files or "sigma" not in files) and not has_images:
                raise DatasetError(f"{p}: expected arrays 'mu' and 'sigma' (ADM format), found {sorted(files)}")

            def text(key: str) -> str | None:
                return str(z[key]) if key in files and str(z[key]) else None

            stats = cls(z["mu"].astype(np.float64) if "mu" in files else None,
                        z["sigma"].astype(np.float64) if "sigma" in files else None,
                        z["mu_s"].astype(np.float64) if "mu_s" in files else None,
                        z["sigma_s"].astype(np.float64) if "sigma_s" in files else None,
                        source=ADM_BATCH if has_images else (text("source") or UNKNOWN),
                        inception_sha256=text("inception_sha256"),
                        num_images=int(z["num_images"]) if "num_images" in files else None,
                        pipeline=PIPELINE if has_images else text("pipeline"), path=str(p), has_images=has_images)
        stats._check(p)
        return stats

    def _check(self, p: Path) -> None:
        from tread_scale.evaluation.inception import FEATURE_DIM, SPATIAL_DIM

        if self.mu is not None and (self.mu.shape != (FEATURE_DIM,) or self.sigma.shape != (FEATURE_DIM,) * 2):
            raise DatasetError(f"{p}: mu/sigma have shapes {self.mu.shape}/{self.sigma.shape}, expected "
                               f"({FEATURE_DIM},)/({FEATURE_DIM}, {FEATURE_DIM}) (Inception pool_3)")
        if self.mu_s is None:
            return
        if self.source != ADM_BATCH and self.pipeline != PIPELINE:
            log.warning("%s: no record of how its spatial statistics (mu_s, sigma_s) were computed (statistics "
                        "saved by tread-scale before pipeline %s used other sFID features); sFID against it "
                        "is not reported", p, PIPELINE)
            self.mu_s = self.sigma_s = None
        elif self.mu_s.shape != (SPATIAL_DIM,) or self.sigma_s.shape != (SPATIAL_DIM,) * 2:
            raise DatasetError(f"{p}: mu_s/sigma_s have shapes {self.mu_s.shape}/{self.sigma_s.shape}, expected "
                               f"({SPATIAL_DIM},)/({SPATIAL_DIM}, {SPATIAL_DIM}) (ADM's mixed_6/conv, 7 channels)")
