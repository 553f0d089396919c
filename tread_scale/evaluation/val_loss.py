"""Fixed-timestep validation loss: one number that is deterministic and comparable across runs, steps and
world sizes (for the DiT and the MMDiT alike).

The protocol (:class:`ValProtocol`, recorded with every result):

* the first ``num_samples`` samples of a dataset (a held-out one, ``evaluation.val_data``, or the training
  data), read directly from its shards, so every run and every world size scores the same samples;
* sample ``i`` gets fixed noise drawn from seed ``mix(0xE7A1, i)``;
* each sample is scored at every one of a fixed set of noise levels: rectified flow at 8 equidistant times
  ``t = (k + 1/2) / 8`` (as MLPerf's Flux benchmark scores 8 equidistant timesteps), EDM at σ ∈ {0.1, 0.5, 1,
  2}; no routing, no condition dropout;
* the result is the mean over samples and levels (and one mean per level).

Bitwise reproducible across world sizes: samples are scored in fixed chunks of :data:`CHUNK` ids (chunk
``c`` on rank ``c mod W``), so a sample's forward pass is the same computation however many ranks share the
work; each rank writes its rows into a zero ``(n, levels)`` table that is summed over ranks (adding exact
zeros changes nothing), and the means are taken over that table in id order in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tread_scale.errors import DatasetError
from tread_scale.rng import mix_seed

COMPARABLE_REASON = ("a validation loss depends on its data, noise levels, noise and objective: compare it only with "
                     "results of the same val_protocol")
#: Samples per forward pass; fixed, so the computation of a sample does not depend on the world size.
CHUNK = 8
NOISE_SEED = 0xE7A1


def default_levels(objective: str) -> list[float]:
    """The noise levels scored when none are configured: t = (k + 1/2)/8 for ``rf``, σ for ``edm``."""
    if objective == "rf":
        return [(k + 0.5) / 8 for k in range(8)]
    return [0.1, 0.5, 1.0, 2.0]


@dataclass(frozen=True)
class ValProtocol:
    """What a validation loss was measured on; two results compare only if these are equal.

    Attributes:
        data: The dataset the samples came from (``remote`` plus split).
        num_samples: Samples scored (the first ones of ``data``).
        levels: Noise levels (t for rectified flow, σ for EDM).
        objective: ``rf`` or ``edm``.
        noise_seed: Seed of the fixed noise (sample ``i`` uses ``mix(noise_seed, i)``).
        objective_args: The objective's settings that change the loss at a fixed level: EDM's ``sigma_data``
            (rectified flow's loss at a given t depends on none; its ``shift`` only moves training's t).
    """

    data: str
    num_samples: int
    levels: tuple[float, ...]
    objective: str
    noise_seed: int = NOISE_SEED
    objective_args: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, data: str, split: str | None, num_samples: int, levels: list[float] | None, objective: str,
           sigma_data: float = 0.5) -> ValProtocol:
        """The protocol for the first ``num_samples`` of ``data`` (``split``), at ``levels`` (default:
        :func:`default_levels`) under ``objective``."""
        return cls(data=f"{data}/{split}" if split else data, num_samples=num_samples,
                   levels=tuple(float(v) for v in (levels or default_levels(objective))), objective=objective,
                   objective_args=(("sigma_data", float(sigma_data)),) if objective == "edm" else ())

    def to_dict(self) -> dict[str, Any]:
        """The protocol as recorded, with its label: never comparable to published numbers."""
        out = asdict(self)
        out["levels"] = list(self.levels)
        out["objective_args"] = dict(self.objective_args)
        out.update(comparable_to_published=False, comparable_reason=COMPARABLE_REASON)
        return out


@dataclass
class ValSet:
    """The fixed samples: latents, conditions (labels or a :class:`~tread_scale.models.conditioning.
    TextCondition`) and noise, in id order."""

    x: torch.Tensor
    y: Any
    noise: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def rows(self, lo: int, hi: int, device: torch.device) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Samples ``lo:hi`` on ``device`` (float32 latents and noise; a text condition in float32)."""
        if isinstance(self.y, torch.Tensor):
            y = self.y[lo:hi].to(device)
        else:
            y = self.y.select(slice(lo, hi)).to(device, torch.float32)
        return self.x[lo:hi].to(device), y, self.noise[lo:hi].to(device)


def fixed_noise(n: int, shape: tuple[int, ...], seed: int = NOISE_SEED) -> torch.Tensor:
    """``(n, *shape)`` standard normal noise; row ``i`` from seed ``mix(seed, i)`` alone."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(seed, i)))
                        for i in range(n)])


def load_valset(remote: str, num_samples: int, split: str | None = None,
                latent_shape: tuple[int, ...] | None = None, text: bool = False) -> ValSet:
    """The first ``num_samples`` samples of a dataset as a :class:`ValSet`.

    Args:
        remote: The dataset root (local folder or ``s3://``).
        num_samples: Samples (fewer if the dataset is smaller).
        split: Its split folder, if any.
        latent_shape: The model's latent shape; a dataset of another shape is refused, naming it.
        text: Whether the model is text-conditioned (then the samples' caption embeddings are its condition).

    A bucketed dataset validates on its base bucket (the square of the model's size), so every sample has one
    shape.

    Raises:
        DatasetError: If the dataset cannot be read, its latents have another shape, it lacks the text
            columns a text model needs, or a latent is not finite.
    """
    from tread_scale.data.stream.direct import base_bucket, read_first_samples

    where = f"{remote}/{split}" if split else remote
    cols = ("latent", "text_emb", "text_mask", "text_pooled") if text else ("latent", "label")
    first, count = base_bucket(remote)
    samples = read_first_samples(remote, min(num_samples, count), split, columns=cols, start=first,
                                 hint=" (a text-conditioned model validates on captioned data)" if text else "")
    x = torch.from_numpy(np.stack([np.asarray(s["latent"], dtype=np.float32) for s in samples]))
    if latent_shape is not None and tuple(x.shape[1:]) != tuple(latent_shape):
        raise DatasetError(f"validation data {where}: latents of shape {tuple(x.shape[1:])}, the model takes "
                           f"{tuple(latent_shape)}")
    bad = (~torch.isfinite(x.flatten(1))).any(1).nonzero().flatten().tolist()
    if bad:
        raise DatasetError(f"validation data {where}: samples {bad[:5]} have non-finite latents")
    if text:
        from tread_scale.models.conditioning import TextCondition

        y: Any = TextCondition(torch.from_numpy(np.stack([s["text_emb"] for s in samples]).astype(np.float32)),
                               torch.from_numpy(np.stack([s["text_mask"] for s in samples]).astype(bool)),
                               torch.from_numpy(np.stack([s["text_pooled"] for s in samples]).astype(np.float32)))
    else:
        y = torch.tensor([int(s["label"]) for s in samples], dtype=torch.int64)
    return ValSet(x, y, fixed_noise(len(samples), tuple(x.shape[1:])))


@torch.no_grad()
def per_sample_losses(net: nn.Module, objective, valset: ValSet, levels: list[float], rank: int = 0,
                      world_size: int = 1, all_reduce: Callable[[torch.Tensor], None] | None = None
                      ) -> torch.Tensor:
    """The ``(n, len(levels))`` float64 table of every sample's loss at every level.

    Args:
        net: The network (put in eval mode by the caller; no routing is forced).
        objective: Has ``loss_at(net, x, y, level, noise)`` returning per-sample losses.
        valset: The fixed samples.
        levels: Noise levels.
        rank: This rank; it scores chunks ``rank, rank + world_size, ...``.
        world_size: Ranks sharing the work.
        all_reduce: In-place SUM over ranks of a float64 tensor (required when ``world_size > 1``).
    """
    device = next(net.parameters()).device
    table = torch.zeros(len(valset), len(levels), dtype=torch.float64, device=device)
    for c in range(rank, -(-len(valset) // CHUNK), world_size):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, len(valset))
        x, y, noise = valset.rows(lo, hi, device)
        for k, level in enumerate(levels):
            lv = torch.full((hi - lo,), float(level), device=device)
            table[lo:hi, k] = objective.loss_at(net, x, y, lv, noise).double()
    if world_size > 1:
        if all_reduce is None:
            raise ValueError("per_sample_losses on several ranks needs all_reduce")
        all_reduce(table)
    return table.cpu()


def summarize(table: torch.Tensor, levels: list[float]) -> dict[str, Any]:
    """``val_loss`` (mean over samples and levels) and ``val_loss_by_level`` of a :func:`per_sample_losses`
    table."""
    per_level = table.mean(0).tolist()
    return {"val_loss": float(sum(per_level) / len(per_level)),
            "val_loss_by_level": {str(float(lv)): v for lv, v in zip(levels, per_level)}}


def val_loss_of_weights(weights: str, data: str, num_samples: int = 64, split: str | None = None,
                        levels: list[float] | None = None, device: str = "auto") -> dict[str, Any]:
    """The fixed-timestep validation loss of exported weights, with the objective they were trained with.

    Every rank of the process group (if any) must call this with the same arguments; the work is split as in
    training and the result is bitwise the same for any world size, and equal to the in-training value of
    the same weights and protocol.

    Args:
        weights: A ``.safetensors`` weight file or a run folder (its ``ema/latest.safetensors``).
        data: The validation dataset (local or ``s3://``).
        num_samples: Its first samples to score.
        split: Its split folder, if any.
        levels: Noise levels (default :func:`default_levels` of the weights' objective).
        device: ``auto``, ``cpu``, ``cuda``...

    Returns:
        ``val_loss``, ``val_loss_by_level`` and ``val_protocol`` (:class:`ValProtocol` as a dict).

    Raises:
        DatasetError: If ``data`` cannot be read or does not fit the model (named).
        CheckpointError: If the weights cannot be loaded.
    """
    import torch.distributed as dist

    from tread_scale.devices import resolve_device
    from tread_scale.diffusion.edm import EDM
    from tread_scale.diffusion.rectified_flow import RectifiedFlow
    from tread_scale.sampling import load_net, world

    net, meta = load_net(weights, resolve_device(device))
    kind = meta.objective_kind
    objective = RectifiedFlow(shift=meta.shift) if kind == "rf" else EDM(sigma_data=meta.sigma_data)
    protocol = ValProtocol.of(data, split, num_samples, levels, kind, meta.sigma_data)
    levels = list(protocol.levels)
    valset = load_valset(data, num_samples, split, latent_shape=(net.in_channels, *net.input_size),
                         text=hasattr(net, "set_null_condition"))
    rank, world_size = world()
    table = per_sample_losses(net.eval(), objective, valset, levels, rank, world_size,
                              lambda t: dist.all_reduce(t))
    return {**summarize(table, levels), "val_protocol": protocol.to_dict()}
