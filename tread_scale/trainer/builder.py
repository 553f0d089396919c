"""Build and run a Composer ``Trainer`` from a :class:`~tread_scale.config.RunConfig`."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tread_scale.config import FSDPConfig, DeepSpeedConfig, RunConfig, dump_config, validate_parallelism
from tread_scale.config_schema import to_dict
from tread_scale.data import object_store as s3
from tread_scale.data.metadata import LatentMetadata, check_against_model, read_metadata
from tread_scale.errors import ConfigError
from tread_scale.factory import build_dit, build_objective
from tread_scale.log_setup import redact, setup_logging
from tread_scale.parallel.process_group import bounded_barrier
from tread_scale.sampling import SamplerSettings

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where a finished run put its outputs."""

    run_dir: Path
    checkpoint_folder: str
    batches: int
    ema_weights: Path | None
    sample_grid: Path | None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("train.device=gpu but no CUDA device is visible")
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "amp_bf16" if device == "gpu" else "fp32"
    if precision.startswith("amp") and device == "cpu":
        raise ConfigError(f"train.precision={precision} needs a GPU; use fp32 on CPU")
    return precision


def per_rank_batch(cfg: RunConfig, world_size: int) -> int:
    gbs = cfg.train.global_batch_size
    if gbs % world_size:
        raise ConfigError(f"train.global_batch_size={gbs} is not divisible by the world size {world_size}")
    return gbs // world_size


def build_dataloader(cfg: RunConfig, meta: LatentMetadata, batch_size: int) -> DataLoader:
    """The training DataLoader over a batched :class:`LatentStreamingDataset` (never wrapped)."""
    from composer.utils import dist

    from tread_scale.data.dataset import BatchLoader, LatentStreamingDataset
    from tread_scale.data.location import stream_location

    d = cfg.data
    if not s3.is_s3(d.remote) and not Path(d.remote, "index.json").is_file():
        raise ConfigError(f"data.remote={d.remote!r}: no index.json there (not an MDS dataset)")
    location = stream_location(d.remote, cfg.data_cache(dist.get_node_rank()), d.split)
    if location["remote"] is not None and not s3.is_s3(d.remote):
        log.info("data.remote=%s has compressed shards: decompressing them into this node's cache %s", d.remote,
                 location["local"])
    if d.cache_limit is not None and location["remote"] is None:
        log.warning("data.cache_limit is set for a local-only dataset; streaming may evict shards it cannot "
                    "download again (mosaicml/streaming#988). Ignoring cache_limit.")
    dataset = LatentStreamingDataset(
        latent_shape=tuple(meta.latent_shape),
        num_classes=cfg.model.num_classes,
        batched=True,
        split=d.split,
        batch_size=batch_size,
        shuffle=d.shuffle,
        shuffle_algo=d.shuffle_algo,
        shuffle_seed=d.shuffle_seed,
        shuffle_block_size=d.shuffle_block_size,
        num_canonical_nodes=d.num_canonical_nodes,
        predownload=d.predownload,
        cache_limit=d.cache_limit if location["remote"] is not None else None,
        download_timeout=d.download_timeout,
        download_retry=d.download_retry,
        stall_timeout=d.stall_timeout,
        validate_hash=d.validate_hash,
        **location,
    )
    workers = d.num_workers
    return BatchLoader(
        dataset,
        num_workers=workers,
        pin_memory=d.pin_memory and torch.cuda.is_available(),
        persistent_workers=d.persistent_workers and workers > 0,
        prefetch_factor=d.prefetch_factor if workers > 0 else None,
        multiprocessing_context=d.worker_start_method if workers > 0 else None,
    )


def redacted_config(cfg: RunConfig) -> dict:
    """The config as a plain dict with secret environment values replaced by ``REDACTED`` (for loggers)."""
    import yaml

    return yaml.safe_load(redact(dump_config(cfg)))


def weights_metadata(cfg: RunConfig, meta: LatentMetadata) -> dict:
    """What an exported weight file records so that it can be rebuilt and sampled on its own."""
    return {
        "run_name": cfg.run_name,
        "model": to_dict(cfg.model),
        "routing": to_dict(cfg.routing),
        "objective": to_dict(cfg.objective),
        "data": {"latent_shape": list(meta.latent_shape), "num_classes": meta.num_classes, "vae": meta.vae,
                 "scaling_factor": meta.scaling_factor, "class_names": meta.class_names},
    }


def _prepare_data_access(cfg: RunConfig) -> LatentMetadata:
    if s3.is_s3(cfg.data.remote):
        s3.check_s3_access(cfg.data.remote)
    if s3.is_s3(cfg.checkpoint_folder()):
        s3.check_s3_access(cfg.checkpoint_folder())
    meta = read_metadata(cfg.data.remote)
    check_against_model(meta, in_channels=cfg.model.in_channels, input_size=cfg.model.input_size,
                        num_classes=cfg.model.num_classes, where=cfg.data.remote)
    return meta


def _make_decoder(cfg: RunConfig, meta: LatentMetadata):
    if meta.vae == "none":
        return None
    if cfg.sampling.vae is None:
        log.warning("dataset latents come from VAE %r but sampling.vae is not set: sample grids show raw latent "
                    "channels", meta.vae)
        return None
    from tread_scale.data.vae import decode, load_vae

    vae = load_vae(cfg.sampling.vae)

    def _decode(latents: torch.Tensor) -> torch.Tensor:
        return decode(vae.to(latents.device), latents).to(latents.device)

    return _decode


def _init_from(net, path: str) -> None:
    from tread_scale.errors import CheckpointError
    from tread_scale.weights import load_weights

    weights, meta = load_weights(path)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"model.init_from={path}: weights do not fit the configured model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("initialised the model from %s (%s)", path, meta.get("source", meta.get("run_name", "")))


def _evaluation_callbacks(cfg: RunConfig, meta: LatentMetadata, ema, dataset, decode, run_dir: Path) -> list:
    from tread_scale.trainer.evaluation import FIDMonitor, ValidationLoss

    ev, out = cfg.evaluation, []

    def make_net():
        return build_dit(cfg.model, cfg.routes, cfg.routing_seed)

    if ev.fid_every:
        sampler = SamplerSettings(cfg.objective.kind, ev.fid_steps, ev.fid_cfg_scale, cfg.objective.sigma_data)
        out.append(FIDMonitor(make_net, ema, ev.inception, ev.reference, ev.fid_every, ev.fid_num_samples, sampler,
                              meta.num_classes, decode, run_dir / "eval.jsonl", ev.fid_batch_size))
    if ev.val_every:
        levels = ev.val_levels or ([0.1, 0.5, 1.0, 2.0] if cfg.objective.kind == "edm" else [0.1, 0.3, 0.5, 0.7, 0.9])
        out.append(ValidationLoss(dataset, make_net, ema, build_objective(cfg.objective), levels, ev.val_every,
                                  ev.val_num_samples, run_dir / "eval.jsonl"))
    return out


def build_trainer(cfg: RunConfig):
    """Everything for one run, checked before the first step: data access, shapes, devices, batch split.

    Returns:
        ``(trainer, handles)`` where ``handles`` holds the callbacks whose outputs the caller may report.
    """
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.utils import dist, get_device, reproducibility
    from streaming.base.util import clean_stale_shared_memory

    from tread_scale.trainer import composer_patches
    from tread_scale.trainer.ema import EMA
    from tread_scale.trainer.ema_export import EMAExport
    from tread_scale.trainer.model import DiffusionModel
    from tread_scale.trainer.metrics_log import MetricsLog
    from tread_scale.trainer.nonfinite import NonFiniteLossGuard
    from tread_scale.trainer.preemption import Preemption
    from tread_scale.trainer.train_step import TrainStep
    from tread_scale.trainer.sample_grid import SampleGrid
    from tread_scale.trainer.tread_algorithm import TREADRouting

    composer_patches.apply()
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    meta = _prepare_data_access(cfg)

    dist.initialize_dist(get_device(device), timeout=300.0)
    world, rank = dist.get_world_size(), dist.get_global_rank()
    batch = per_rank_batch(cfg, world)
    par = cfg.parallelism
    validate_parallelism(par, world)
    microbatch = cfg.train.device_microbatch_size or batch
    if batch % microbatch:
        raise ConfigError(f"train.device_microbatch_size={microbatch} does not divide the per-rank batch {batch}")
    run_dir = cfg.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(redact(dump_config(cfg)))
    if dist.get_local_rank() == 0:
        from tread_scale.data.shm import clean_dead_streaming_shm

        clean_dead_streaming_shm()  # what killed runs left, also past gaps in streaming's numbering
    clean_stale_shared_memory()  # collective: local rank 0 cleans while the others wait
    log.info("run %s: %s over %d rank(s), %d samples per rank per batch (micro-batch %d), device %s, precision %s"
             "%s", cfg.run_name, par.backend, world, batch, microbatch, device, precision,
             ", activation checkpointing per block" if par.activation_checkpointing else "")

    loader = build_dataloader(cfg, meta, batch)
    reproducibility.seed_all(cfg.seed)  # identical initial weights on every rank and every run
    net = build_dit(cfg.model)
    net.grad_checkpointing = par.activation_checkpointing
    if cfg.train.compile:
        for block in net.blocks:
            block.compile(backend=cfg.train.compile_backend)
    if cfg.model.init_from:
        _init_from(net, cfg.model.init_from)
    model = DiffusionModel(net, build_objective(cfg.objective), seed=cfg.seed)
    # Fused AdamW: on GPU, and on CPU for plain (DDP) parameters, where it is 9x the default loop (B/2:
    # 53 vs 487 ms a step); CPU FSDP2 (DTensor) and DeepSpeed parameters keep the default.
    fused = cfg.optimizer.fused if cfg.optimizer.fused is not None else (device == "gpu" or par.backend == "ddp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas),
                                  eps=cfg.optimizer.eps, weight_decay=cfg.optimizer.weight_decay, fused=fused)
    algorithms = []
    if cfg.routes:
        algorithms.append(TREADRouting(cfg.routes, seed=cfg.routing_seed))
    if cfg.optimizer.grad_clip_norm is not None and par.backend != "deepspeed":  # DeepSpeed clips in its step
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=cfg.optimizer.grad_clip_norm))

    ema = EMA(cfg.ema.decay) if cfg.ema.enabled else None
    ckpt = cfg.checkpoint_folder()
    wmeta = weights_metadata(cfg, meta)
    export = EMAExport(ema, run_dir / "ema", cfg.train.save_interval, wmeta,
                       remote_dir=s3.join_uri(ckpt, "ema") if s3.is_s3(ckpt) else None)
    decode = _make_decoder(cfg, meta)
    grid = SampleGrid(
        make_net=lambda: build_dit(cfg.model, cfg.routes, cfg.routing_seed),
        ema=ema, out_dir=run_dir / "samples", interval=cfg.sampling.every,
        sampler=SamplerSettings(cfg.objective.kind, cfg.sampling.steps, cfg.sampling.cfg_scale,
                                cfg.objective.sigma_data),
        num_classes=meta.num_classes, num_images=cfg.sampling.num_images, seed=cfg.sampling.seed, decode=decode,
        at_fit_end=cfg.sampling.at_fit_end,
    )
    metrics = MetricsLog(run_dir / "metrics.jsonl", interval=cfg.logging.metrics_interval,
                         peak_flops=cfg.logging.peak_flops)
    guard = NonFiniteLossGuard(cfg.train.nonfinite_loss, cfg.train.max_skipped_batches)
    callbacks = [c for c in (TrainStep(), guard, ema, export, grid, metrics) if c is not None]
    callbacks += _evaluation_callbacks(cfg, meta, ema, loader.dataset, decode, run_dir)
    if cfg.logging.sample_ledger:
        from tread_scale.trainer.sample_ledger import SampleLedger

        callbacks.append(SampleLedger(run_dir / "ledger"))
    callbacks.append(Preemption(cfg.train.preemption_flag, grace=cfg.train.preemption_grace))
    ckpt_remote_plain = s3.is_s3(ckpt) and not (par.backend == "fsdp" and (par.fsdp or FSDPConfig()).state_dict_type
                                                 == "sharded") and par.backend != "deepspeed"
    if ckpt_remote_plain:
        from tread_scale.trainer.remote_checkpoints import CheckpointManifests, repair_remote_latest

        callbacks.append(CheckpointManifests(ckpt))
        if cfg.train.autoresume and rank == 0:
            repair_remote_latest(ckpt)
        dist.barrier()
    if cfg.train.autoresume:
        from tread_scale.trainer.local_checkpoints import set_aside_orphans

        if dist.get_local_rank() == 0:
            set_aside_orphans(local_checkpoint_folder(cfg))
        dist.barrier()
    trainer_cls, extra = Trainer, {}
    if par.backend == "fsdp":
        from tread_scale.parallel.fsdp import fsdp2_config

        extra["parallelism_config"] = {"fsdp": fsdp2_config(par.fsdp or FSDPConfig())}
    elif par.backend == "deepspeed":
        from tread_scale.parallel.deepspeed import DeepSpeedCheckpoint, DeepSpeedTrainer, deepspeed_config

        trainer_cls = DeepSpeedTrainer
        extra["deepspeed_config"] = deepspeed_config(par.deepspeed or DeepSpeedConfig(), microbatch, world, precision,
                                                     cfg.optimizer.grad_clip_norm, device)
        callbacks.insert(0, DeepSpeedCheckpoint(ckpt, run_dir / "deepspeed", cfg.train.save_interval,
                                                cfg.train.save_num_checkpoints_to_keep))

    loggers = []
    save_folder: str | None = ckpt
    if s3.is_s3(ckpt):
        # Stage checkpoints in the run folder and upload them through a logger destination. (Handing Composer
        # the s3:// URI as save_folder makes it stage and download checkpoints under ./s3:/<bucket>/… in the
        # current directory, where a later run of the same name would resume from a stale copy.)
        from composer.callbacks import CheckpointSaver
        from composer.loggers import RemoteUploaderDownloader

        bucket, prefix = s3.parse_s3_uri(ckpt)
        callbacks.append(CheckpointSaver(
            folder=str(local_checkpoint_folder(cfg)), filename="ep{epoch}-ba{batch}-rank{rank}.pt",
            remote_file_name=f"{prefix}/ep{{epoch}}-ba{{batch}}-rank{{rank}}.pt", latest_filename="latest-rank{rank}.pt",
            latest_remote_file_name=f"{prefix}/latest-rank{{rank}}.pt", save_interval=cfg.train.save_interval,
            num_checkpoints_to_keep=cfg.train.save_num_checkpoints_to_keep))
        # threads, not processes: a failed upload then surfaces as an error instead of a dead worker process
        # whose (unpicklable botocore) exception never arrives, which leaves Composer waiting for ever
        loggers.append(RemoteUploaderDownloader(bucket_uri=f"s3://{bucket}", num_concurrent_uploads=1,
                                                upload_staging_folder=str(run_dir / ".upload_staging"),
                                                use_procs=False))
        save_folder = None
    if cfg.logging.wandb.enabled:
        from tread_scale.trainer.wandb_logger import OfflineSafeWandBLogger

        w = redacted_config(cfg)["logging"]["wandb"]
        loggers.append(OfflineSafeWandBLogger(mode=w["mode"], project=w["project"], entity=w["entity"],
                                              group=w["group"], name=redact(cfg.run_name), tags=list(w["tags"]),
                                              init_kwargs={"config": redacted_config(cfg), "dir": str(run_dir)}))

    trainer = trainer_cls(
        model=model,
        train_dataloader=loader,
        max_duration=cfg.train.max_duration,
        optimizers=optimizer,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        run_name=cfg.run_name,
        save_folder=save_folder,
        save_interval=cfg.train.save_interval,
        save_num_checkpoints_to_keep=cfg.train.save_num_checkpoints_to_keep,
        autoresume=cfg.train.autoresume,
        device=device,
        precision=precision,
        device_train_microbatch_size=microbatch,
        seed=cfg.seed,
        deterministic_mode=cfg.train.deterministic,
        progress_bar=cfg.logging.progress_bar,
        log_to_console=not cfg.logging.progress_bar,
        console_log_interval=cfg.logging.console_interval,
        python_log_level=None,
        **extra,
    )
    return trainer, {"ema": ema, "export": export, "grid": grid}


def _enospc_in(exc: BaseException) -> OSError | None:
    """The ``ENOSPC`` error in an exception's chain (torch.save re-raises it as a RuntimeError), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def local_checkpoint_folder(cfg: RunConfig) -> Path:
    """Where checkpoints are written locally (the folder itself, or the staging folder of an s3:// one)."""
    ckpt = cfg.checkpoint_folder()
    return cfg.run_dir / "checkpoints" if s3.is_s3(ckpt) else Path(ckpt)


def _no_space(cfg: RunConfig):
    """A clear error for a checkpoint that did not fit; removes the partial file, keeps the last good one."""
    from tread_scale.errors import CheckpointError

    folder = local_checkpoint_folder(cfg)
    latest = folder / "latest-rank0.pt"
    good = os.path.realpath(latest) if latest.is_symlink() else None
    partial = None
    for p in folder.glob("*.pt"):
        if p.is_file() and not p.is_symlink() and os.path.realpath(p) != good and \
                (good is None or p.stat().st_mtime >= Path(good).stat().st_mtime):
            partial = p
            p.unlink()  # a truncated checkpoint is useless and holds the space
    return CheckpointError(f"no space left on the device holding {folder} while writing a checkpoint"
                           f"{f' ({partial.name}, removed)' if partial else ''}; the last complete checkpoint "
                           f"({Path(good).name if good else 'none yet'}) is intact and autoresume will use it. "
                           "Free space or point train.save_folder elsewhere, then rerun the same command.")


def train(cfg: RunConfig) -> TrainResult:
    """Train per ``cfg`` (resuming automatically when a checkpoint of the same run exists)."""
    setup_logging(cfg.logging.level)
    if cfg.logging.wandb.enabled and cfg.logging.wandb.mode != "online":
        os.environ.setdefault("WANDB_MODE", cfg.logging.wandb.mode)
    trainer, handles = build_trainer(cfg)
    bounded_barrier("start of training", cfg.train.barrier_timeout)
    try:
        trainer.fit()
        batches = int(trainer.state.timestamp.batch)
        bounded_barrier("end of training", cfg.train.barrier_timeout)
    except Exception as e:
        # Composer's close() ends with an unbounded-message barrier; a failed rank's peers may never
        # reach it, so after an error only the callbacks and loggers are closed, and the error leaves now.
        trainer.engine.close()
        nospace = _enospc_in(e)
        if nospace is None:
            raise
        raise _no_space(cfg) from None
    trainer.close()
    return TrainResult(cfg.run_dir, cfg.checkpoint_folder(), batches, handles["export"].last_export,
                       handles["grid"].last_grid)
