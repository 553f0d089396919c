"""Composer callbacks of a training run (one per file) and :func:`build_callbacks`, which picks them for a run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tread_scale.data.metadata import LatentMetadata

log = logging.getLogger(__name__)


@dataclass
class RunCallbacks:
    """The callbacks of a run, in the order Composer runs them, and those whose outputs the caller reports."""

    callbacks: list
    ema: Any
    export: Any
    grid: Any
    preemption: Any


def build_callbacks(cfg, run, meta: LatentMetadata) -> RunCallbacks:
    """Step counter, NaN guard, EMA and its export, sample grid, metrics, evaluation, ledger, preemption.

    Args:
        cfg: The validated :class:`~tread_scale.config.RunConfig`.
        run: The run's :class:`~tread_scale.trainer.run.RunContext`.
        meta: The dataset's facts.
    """
    from tread_scale.data import object_store as s3
    from tread_scale.factory import build_net
    from tread_scale.sampling import SamplerSettings, make_decoder
    from tread_scale.trainer.callbacks.ema import EMA
    from tread_scale.trainer.callbacks.ema_export import EMAExport
    from tread_scale.trainer.callbacks.metrics_log import MetricsLog
    from tread_scale.trainer.callbacks.nonfinite import NonFiniteLossGuard
    from tread_scale.trainer.callbacks.preemption import Preemption
    from tread_scale.trainer.callbacks.sample_grid import SampleGrid
    from tread_scale.trainer.model import TrainStep
    from tread_scale.weights import WeightsMeta

    def make_net():  # a fresh sampling network (EMA weights are copied into it)
        return build_net(cfg.model, cfg.routes, cfg.routing_seed)

    ema = EMA(cfg.ema.decay) if cfg.ema.enabled else None
    ckpt = cfg.checkpoint_folder()
    export = EMAExport(ema, run.run_dir / "ema", cfg.train.save_interval, WeightsMeta.from_run(cfg, meta),
                       remote_dir=s3.join_uri(ckpt, "ema") if s3.is_s3(ckpt) else None)
    decode = make_decoder(cfg.sampling.vae if meta.vae != "none" else None, meta.vae, setting="sampling.vae")
    grid = SampleGrid(
        make_net=make_net,
        ema=ema, out_dir=run.run_dir / "samples", interval=cfg.sampling.every,
        sampler=SamplerSettings(cfg.objective.kind, cfg.sampling.steps, cfg.sampling.cfg_scale,
                                cfg.objective.sigma_data, cfg.objective.shift),
        num_classes=meta.num_classes, num_images=cfg.sampling.num_images, seed=cfg.sampling.seed, decode=decode,
        at_fit_end=cfg.sampling.at_fit_end, prompts=grid_prompts(cfg, meta, run.rank),
    )
    metrics = MetricsLog(run.run_dir / "metrics.jsonl", interval=cfg.logging.metrics_interval,
                         peak_flops=cfg.logging.peak_flops)
    guard = NonFiniteLossGuard(cfg.train.nonfinite_loss, cfg.train.max_skipped_batches)
    callbacks = [c for c in (TrainStep(), guard, ema, export, grid, metrics) if c is not None]
    callbacks += _evaluation_callbacks(cfg, meta, make_net, ema, decode, run.run_dir)
    if cfg.logging.sample_ledger:
        from tread_scale.trainer.callbacks.sample_ledger import SampleLedger

        callbacks.append(SampleLedger(run.run_dir / "ledger"))
    preemption = Preemption(cfg.train.preemption_flag, grace=cfg.train.preemption_grace)
    callbacks.append(preemption)
    return RunCallbacks(callbacks, ema, export, grid, preemption)


def grid_prompts(cfg, meta: LatentMetadata, rank: int):
    """The prompts of a text-conditioned run's sample grids (``None`` for a DiT, and on ranks other than 0).

    ``sampling.prompts`` encoded with the ``text`` section's encoders (checked against the dataset's), or
    else the captions and stored embeddings of the dataset's first ``sampling.num_images`` samples. Read once,
    at start, on rank 0 (the rank that samples).

    Raises:
        ConfigError: If prompts are set without encoders, or the encoders are not the dataset's.
        DatasetError: If the dataset's first samples cannot be read.
    """
    from tread_scale.errors import ConfigError
    from tread_scale.sampling import dataset_prompts, encode_prompts

    if cfg.model.model_family() != "mmdit" or rank != 0:
        return None
    s = cfg.sampling
    if s.prompts:
        if not any(cfg.text.folders().values()):
            raise ConfigError("sampling.prompts needs the text encoders to embed them: set text.t5 and/or text.clip "
                              "to the local folders the dataset was converted with (or leave sampling.prompts "
                              "unset to sample the dataset's own first captions)")
        return encode_prompts(s.prompts, meta.text, **cfg.text.folders(), where=cfg.data.remote, flag_prefix="text.")
    prompts = dataset_prompts(cfg.data.remote, s.num_images, cfg.data.split)
    log.info("sample grids show the captions of the dataset's first %d samples (set sampling.prompts to choose)",
             len(prompts))
    return prompts


def _evaluation_callbacks(cfg, meta: LatentMetadata, make_net, ema, decode, run_dir) -> list:
    """In-training FID and validation loss, when ``evaluation.fid_every`` / ``val_every`` are set."""
    from tread_scale.factory import build_objective
    from tread_scale.sampling import SamplerSettings
    from tread_scale.trainer.callbacks.evaluation import FIDMonitor, ValidationLoss, val_protocol, val_source

    ev, out = cfg.evaluation, []
    if ev.fid_every:
        sampler = SamplerSettings(cfg.objective.kind, ev.fid_steps, ev.fid_cfg_scale, cfg.objective.sigma_data,
                                  cfg.objective.shift)
        prompts, source = None, None
        if cfg.model.model_family() == "mmdit":  # one image per caption of the validation data's first samples
            from tread_scale.sampling import dataset_prompts

            root, split = val_source(cfg)
            prompts = dataset_prompts(root, ev.fid_num_samples, split)
            source = f"captions of {root}{'/' + split if split else ''} (first {len(prompts)})"
        out.append(FIDMonitor(make_net, ema, ev.inception, ev.reference, ev.fid_every, ev.fid_num_samples, sampler,
                              meta.num_classes, decode, run_dir / "eval.jsonl", ev.fid_batch_size, prompts=prompts,
                              clip=ev.clip, prompt_source=source))
    if ev.val_every:
        out.append(ValidationLoss(val_protocol(cfg), val_source(cfg), make_net, ema,
                                  build_objective(cfg.objective), ev.val_every, run_dir / "eval.jsonl",
                                  meta.latent_shape, cfg.model.model_family() == "mmdit"))
    return out
