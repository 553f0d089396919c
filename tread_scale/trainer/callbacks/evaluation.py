"""In-training evaluation: FID-k with the EMA weights and fixed seeds, and a fixed-σ validation loss."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from tread_scale.errors import ConfigError
from tread_scale.models.dit import DiT
from tread_scale.rng import mix_seed
from tread_scale.sampling import SamplerSettings
from tread_scale.trainer.callbacks.ema import EMA
from tread_scale.trainer.callbacks.net_copy import NetCopy, weights_to_sample

log = logging.getLogger(__name__)


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


class FIDMonitor(Callback):
    """Every ``interval``, FID of ``num_samples`` EMA samples (seeds ``0..k-1``) against reference statistics.

    Generation and Inception features are spread over all ranks (an unwrapped copy of the network per
    rank); the result goes to the loggers as ``eval/fid`` (and ``eval/sfid`` when the reference has spatial
    statistics) and to ``<run>/eval.jsonl``. Each record carries ``comparable_to_published`` and
    ``comparable_reason`` (:func:`tread_scale.evaluation.reference.comparability`): an FID-5K is never
    comparable to a published FID-50K, whatever the weights and reference. The loggers get the flag as
    ``eval/comparable_to_published`` (1.0 / 0.0) and the reason once, as a hyperparameter.

    Args:
        make_net: Builds an unwrapped DiT of the trained architecture.
        ema: EMA callback (raw weights if ``None``).
        inception_path: Local FID Inception weights.
        reference: ADM-style ``.npz`` of reference statistics.
        interval: e.g. ``10000ba``.
        num_samples: Samples per evaluation (5000 in the reference: FID-5K).
        sampler: Objective, steps, guidance scale and σ_data of the sampler.
        num_classes: Labels are drawn per seed from ``0..num_classes-1``.
        decode: Latents → images, or ``None`` for pixel-space data.
        eval_file: ``eval.jsonl`` path.
        batch_size: Samples per forward pass.
    """

    def __init__(self, make_net: Callable[[], DiT], ema: EMA | None, inception_path: str, reference: str,
                 interval: str, num_samples: int, sampler: SamplerSettings, num_classes: int,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None, eval_file: str | Path,
                 batch_size: int = 32) -> None:
        from tread_scale.evaluation.metrics import ReferenceStats

        self.net = NetCopy(make_net)
        self.ema = ema
        self.inception_path = inception_path
        self.reference = ReferenceStats.load(reference)
        if self.reference.mu is None:
            raise ConfigError(f"evaluation.reference: {reference} is an ADM reference batch without stored "
                              "statistics (mu, sigma); compute them once with `tread-scale fid --ref "
                              f"{reference} --save-ref stats.npz` and pass that file")
        self._due = create_interval_scheduler(interval, include_end_of_training=False, checkpoint_events=False)
        self.num_samples = num_samples
        self.sampler = sampler
        self.num_classes = num_classes
        self.decode = decode
        self.eval_file = Path(eval_file)
        self.batch_size = batch_size
        self._inception = None
        self._reason_logged = False

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_END and self._due(state, event):
            self.evaluate(state, logger)

    @torch.no_grad()
    def evaluate(self, state: State, logger: Logger) -> float:
        from tread_scale.evaluation.fid import features_of, scores
        from tread_scale.evaluation.inception import load_inception
        from tread_scale.evaluation.reference import comparability
        from tread_scale.sampling import generate, rank_indices

        t0 = time.time()
        net = self.net.load(state, weights_to_sample(state, self.ema))
        device = next(net.parameters()).device
        if self._inception is None:
            self._inception = load_inception(self.inception_path, device)
        rank, world_size = dist.get_global_rank(), dist.get_world_size()
        batches = (images for _, _, images, _ in generate(
            net, self.sampler.objective, rank_indices(self.num_samples, rank, world_size), seed=0,
            num_classes=self.num_classes, steps=self.sampler.steps, guidance=self.sampler.guidance(),
            edm=self.sampler.edm(), device=device, batch_size=self.batch_size, decode=self.decode,
            shift=self.sampler.shift))
        result = scores(features_of(batches, self._inception, device), self.reference)
        comparable, reason = comparability(self._inception.standard_weights, self.reference, result["num_samples"])
        self.net.park()
        step = int(state.timestamp.batch)
        metrics = {"eval/fid": result["fid"], "eval/comparable_to_published": float(comparable)}
        if "sfid" in result:
            metrics["eval/sfid"] = result["sfid"]
        logger.log_metrics(metrics)
        if not self._reason_logged:
            logger.log_hyperparameters({"eval/comparable_reason": reason})
            self._reason_logged = True
        if rank == 0:
            record = {"step": step, "fid": result["fid"], "num_samples": self.num_samples,
                      "seconds": round(time.time() - t0, 1), "comparable_to_published": comparable,
                      "comparable_reason": reason}
            if "sfid" in result:
                record["sfid"] = result["sfid"]
            _append(self.eval_file, record)
            log.info("FID-%d at batch %d: %.3f (%.0f s; %s)", self.num_samples, step, result["fid"],
                     time.time() - t0, reason)
        return result["fid"]


class ValidationLoss(Callback):
    """Every ``interval``, the loss of fixed samples at a fixed grid of noise levels, with fixed noise.

    Low-variance by construction: the same latents, labels (or caption embeddings), noise and σ (or t) every
    time, the EMA weights, no label dropout, no routing. Each rank takes its share of ``num_samples`` dataset
    samples; the mean is all-reduced. Logged as ``val/loss`` and ``val/loss@<level>``, and to ``<run>/eval.jsonl``.

    Args:
        dataset: The training dataset (indexable).
        make_net: Builds an unwrapped DiT.
        ema: EMA callback (raw weights if ``None``).
        objective: The training objective (its ``loss_at``).
        levels: σ values (EDM) or t values (rectified flow).
        interval: e.g. ``1000ba``.
        num_samples: Fixed samples (spread over ranks).
        eval_file: ``eval.jsonl`` path.
    """

    def __init__(self, dataset, make_net: Callable[[], DiT], ema: EMA | None, objective, levels: list[float],
                 interval: str, num_samples: int, eval_file: str | Path) -> None:
        self.dataset = dataset
        self.net = NetCopy(make_net)
        self.ema = ema
        self.objective = objective
        self.levels = [float(v) for v in levels]
        self._due = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False,
                                              final_events={Event.BATCH_END})
        self.num_samples = num_samples
        self.eval_file = Path(eval_file)
        self._batch = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_END and self._due(state, event):
            self.evaluate(state, logger)

    def _fixed_batch(self, device: torch.device):
        if self._batch is None:
            rank, world_size = dist.get_global_rank(), dist.get_world_size()
            n = min(self.num_samples, len(self.dataset))
            idx = list(range(rank, n, world_size))
            items = [self.dataset[i] for i in idx]
            x = torch.stack([it["latent"].float() for it in items])
            if "text_emb" in items[0]:  # a text-conditioned model: each sample's own caption embedding
                from tread_scale.models.conditioning import BATCH_KEYS, TextCondition

                y = TextCondition.from_batch({k: torch.stack([it[k] for it in items]) for k in BATCH_KEYS})
                y = y.to(None, torch.float32)
            else:
                y = torch.stack([it["label"] for it in items])
            noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(mix_seed(0xE7A1, i)))
                                 for i in idx])
            self._batch = (x, y, noise)
        return tuple(t.to(device) for t in self._batch)

    @torch.no_grad()
    def evaluate(self, state: State, logger: Logger) -> float:
        net = self.net.load(state, weights_to_sample(state, self.ema))
        device = next(net.parameters()).device
        net.eval()
        x, y, noise = self._fixed_batch(device)
        sums = torch.zeros(len(self.levels) + 1, dtype=torch.float64, device=device)
        for k, level in enumerate(self.levels):
            lv = torch.full((x.shape[0],), level, device=device)
            sums[k] = self.objective.loss_at(net, x, y, lv, noise).double().sum()
        sums[-1] = x.shape[0]
        dist.all_reduce(sums, reduce_operation="SUM")
        per_level = (sums[:-1] / sums[-1]).tolist()
        self.net.park()
        mean = float(sum(per_level) / len(per_level))
        metrics = {"val/loss": mean, **{f"val/loss@{lv:g}": v for lv, v in zip(self.levels, per_level)}}
        logger.log_metrics(metrics)
        if dist.get_global_rank() == 0:
            _append(self.eval_file, {"step": int(state.timestamp.batch), "val_loss": mean,
                                     "val_loss_by_level": dict(zip(map(str, self.levels), per_level))})
        return mean
