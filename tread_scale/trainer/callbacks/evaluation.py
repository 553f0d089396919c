"""In-training evaluation: FID-k with the EMA weights and fixed seeds, and the fixed-timestep validation loss."""

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
from tread_scale.evaluation.val_loss import ValProtocol, ValSet, load_valset, per_sample_losses, summarize
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
        make_net: Builds an unwrapped network of the trained architecture (DiT or MMDiT).
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
        prompts: A text-to-image model's prompt set (sample ``i`` gets prompt ``i``: one image per prompt, so at
            most ``len(prompts)`` samples) and what it is (``prompt_source``, recorded); ``None`` for a DiT.
        clip: A local CLIP folder: also the CLIP score of each image with its prompt (``eval/clip_score``).
        prompt_source: Where the prompts came from (e.g. the validation data's first captions).
    """

    def __init__(self, make_net: Callable[[], torch.nn.Module], ema: EMA | None, inception_path: str,
                 reference: str, interval: str, num_samples: int, sampler: SamplerSettings, num_classes: int,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None, eval_file: str | Path,
                 batch_size: int = 32, prompts=None, clip: str | None = None, prompt_source: str | None = None
                 ) -> None:
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
        self.prompts = prompts
        self.prompt_source = prompt_source
        if prompts is not None and num_samples > len(prompts):
            log.warning("in-training FID: %d prompts (%s) for evaluation.fid_num_samples=%d: one image per prompt, "
                        "so FID-%d", len(prompts), prompt_source, num_samples, len(prompts))
            self.num_samples = len(prompts)
        self.clip = clip
        self._scorer = None
        self._inception = None
        self._reason_logged = False

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_END and self._due(state, event):
            self.evaluate(state, logger)

    @torch.no_grad()
    def evaluate(self, state: State, logger: Logger) -> float:
        from tread_scale.evaluation.fid import features_of, scores
        from tread_scale.evaluation.inception import load_inception
        from tread_scale.evaluation.clip_score import CLIPTally
        from tread_scale.evaluation.reference import comparability, text_to_image_reason
        from tread_scale.sampling import generate, rank_indices

        t0 = time.time()
        net = self.net.load(state, weights_to_sample(state, self.ema))
        device = next(net.parameters()).device
        if self._inception is None:
            self._inception = load_inception(self.inception_path, device)
        if self.clip is not None and self._scorer is None:
            from tread_scale.evaluation.clip_score import CLIPScorer

            self._scorer = CLIPScorer(self.clip, device=device)
        rank, world_size = dist.get_global_rank(), dist.get_world_size()
        generated = generate(
            net, self.sampler.objective, rank_indices(self.num_samples, rank, world_size), seed=0,
            num_classes=self.num_classes, steps=self.sampler.steps, guidance=self.sampler.guidance(),
            edm=self.sampler.edm(), device=device, batch_size=self.batch_size, decode=self.decode,
            shift=self.sampler.shift, prompts=self.prompts, num=self.num_samples)
        tally = CLIPTally(self._scorer, self.prompts.prompts, device) if self._scorer is not None else None

        def batches():
            for _, _, images, ys in generated:
                if tally is not None:
                    tally.add(images, ys)
                yield images

        result = scores(features_of(batches(), self._inception, device), self.reference)
        comparable, reason = comparability(self._inception.standard_weights, self.reference, result["num_samples"])
        if self.prompts is not None:
            comparable, reason = False, text_to_image_reason(reason)
        self.net.park()
        step = int(state.timestamp.batch)
        metrics = {"eval/fid": result["fid"], "eval/comparable_to_published": float(comparable)}
        if "sfid" in result:
            metrics["eval/sfid"] = result["sfid"]
        if tally is not None:
            result["clip_score"] = metrics["eval/clip_score"] = tally.mean()
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
            if self.prompts is not None:
                record["prompts"] = self.prompt_source
            if "clip_score" in result:
                record["clip_score"], record["clip_model"] = result["clip_score"], self._scorer.describe()
            _append(self.eval_file, record)
            log.info("FID-%d at batch %d: %.3f (%.0f s; %s)", self.num_samples, step, result["fid"],
                     time.time() - t0, reason)
        return result["fid"]


def val_source(cfg) -> tuple[str, str | None]:
    """``(root, split)`` of a run's validation data: ``evaluation.val_data`` if set, else the training data."""
    ev = cfg.evaluation
    return (ev.val_data, ev.val_split) if ev.val_data else (cfg.data.remote, cfg.data.split)


def val_protocol(cfg) -> ValProtocol:
    """The validation-loss protocol a run's config asks for (:mod:`tread_scale.evaluation.val_loss`)."""
    ev, obj = cfg.evaluation, cfg.objective
    return ValProtocol.of(*val_source(cfg), ev.val_num_samples, ev.val_levels, obj.kind, obj.sigma_data)


class ValidationLoss(Callback):
    """Every ``interval``, the fixed-timestep validation loss of the EMA weights (raw weights without EMA).

    The protocol is :mod:`tread_scale.evaluation.val_loss`: the first samples of the validation data, fixed
    noise per sample, fixed noise levels, no routing, no condition dropout; bitwise the same for any world
    size. Logged as ``val/loss`` and ``val/loss@<level>``, and to ``<run>/eval.jsonl`` with the protocol.

    Args:
        protocol: What to measure (:func:`val_protocol`).
        source: ``(root, split)`` of the validation data (:func:`val_source`).
        make_net: Builds an unwrapped network.
        ema: EMA callback (raw weights if ``None``).
        objective: The training objective (its ``loss_at``).
        interval: e.g. ``1000ba``.
        eval_file: ``eval.jsonl`` path.
        latent_shape: The model's latent shape (validation data of another shape is refused at start).
        text: Whether the model is text-conditioned (validated on its samples' caption embeddings).
    """

    def __init__(self, protocol: ValProtocol, source: tuple[str, str | None], make_net: Callable[[], torch.nn.Module],
                 ema: EMA | None, objective, interval: str, eval_file: str | Path,
                 latent_shape: tuple[int, ...], text: bool) -> None:
        self.protocol = protocol
        self.source = source
        self.latent_shape, self.text = tuple(latent_shape), text
        self.net = NetCopy(make_net)
        self.ema = ema
        self.objective = objective
        self.levels = list(protocol.levels)
        self._due = create_interval_scheduler(interval, include_end_of_training=True, checkpoint_events=False,
                                              final_events={Event.BATCH_END})
        self.eval_file = Path(eval_file)
        self._valset: ValSet | None = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START and self._valset is None:
            self._load()  # at start: a bad validation dataset fails the run before any training
        if event == Event.BATCH_END and self._due(state, event):
            self.evaluate(state, logger)

    def _load(self) -> ValSet:
        if self._valset is None:
            root, split = self.source
            self._valset = load_valset(root, self.protocol.num_samples, split, latent_shape=self.latent_shape,
                                       text=self.text)
        return self._valset

    @torch.no_grad()
    def evaluate(self, state: State, logger: Logger) -> float:
        valset = self._load()
        net = self.net.load(state, weights_to_sample(state, self.ema))
        net.eval()

        def reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, reduce_operation="SUM")

        table = per_sample_losses(net, self.objective, valset, self.levels, dist.get_global_rank(),
                                  dist.get_world_size(), reduce)
        self.net.park()
        result = summarize(table, self.levels)
        logger.log_metrics({"val/loss": result["val_loss"],
                            **{f"val/loss@{float(k):g}": v for k, v in result["val_loss_by_level"].items()}})
        if dist.get_global_rank() == 0:
            _append(self.eval_file, {"step": int(state.timestamp.batch), **result,
                                     "val_protocol": self.protocol.to_dict()})
        return result["val_loss"]
