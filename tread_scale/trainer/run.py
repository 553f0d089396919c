"""The facts of one run that every part of the trainer needs: devices, precision, world, batch split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tread_scale.config import RunConfig, dump_config, validate_parallelism
from tread_scale.devices import composer_device, resolve_device
from tread_scale.errors import ConfigError
from tread_scale.log_setup import redact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """Where and how this process trains.

    Attributes:
        device: Composer's device name (``gpu`` or ``cpu``).
        precision: Composer's precision (``fp32``, ``amp_bf16``, ...).
        world: Number of ranks.
        rank: This process's global rank.
        batch: Samples per rank per optimizer step.
        microbatch: Samples per rank per forward/backward.
        run_dir: The run's output folder.
    """

    device: str
    precision: str
    world: int
    rank: int
    batch: int
    microbatch: int
    run_dir: Path


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` → bf16 autocast on GPU, fp32 on CPU; ``amp_bf16`` on CPU autocasts there; fp16 on CPU is refused."""
    if precision == "auto":
        return "amp_bf16" if device == "gpu" else "fp32"
    if precision == "amp_fp16" and device == "cpu":
        raise ConfigError(f"train.precision={precision} needs a GPU; use fp32 or amp_bf16 on CPU")
    return precision


def per_rank_batch(cfg: RunConfig, world_size: int) -> int:
    """The per-rank batch (``train.global_batch_size / world_size``), which must divide evenly."""
    gbs = cfg.train.global_batch_size
    if gbs % world_size:
        raise ConfigError(f"train.global_batch_size={gbs} is not divisible by the world size {world_size}")
    return gbs // world_size


def start_run(cfg: RunConfig) -> RunContext:
    """Resolve devices, join the process group, split the batch, write the run folder's ``config.yaml``
    (secrets redacted) and clear stale shared memory on this node.

    Args:
        cfg: The validated config.

    Raises:
        ConfigError: For a device, precision or batch split that cannot work.
    """
    from composer.utils import dist, get_device
    from streaming.base.util import clean_stale_shared_memory

    from tread_scale.data.stream.shm import clean_dead_streaming_shm

    device = composer_device(resolve_device(cfg.train.device, setting="train.device"))
    precision = resolve_precision(cfg.train.precision, device)
    dist.initialize_dist(get_device(device), timeout=cfg.train.collective_timeout)
    world, rank = dist.get_world_size(), dist.get_global_rank()
    batch = per_rank_batch(cfg, world)
    validate_parallelism(cfg.parallelism, world)
    microbatch = cfg.train.device_microbatch_size or batch
    if batch % microbatch:
        raise ConfigError(f"train.device_microbatch_size={microbatch} does not divide the per-rank batch {batch}")
    run = RunContext(device, precision, world, rank, batch, microbatch, cfg.run_dir)
    if rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(redact(dump_config(cfg)))
    if dist.get_local_rank() == 0:
        clean_dead_streaming_shm()  # what killed runs left, also past gaps in streaming's numbering
    clean_stale_shared_memory()  # collective: local rank 0 cleans while the others wait
    par = cfg.parallelism
    log.info("run %s: %s over %d rank(s), %d samples per rank per batch (micro-batch %d), device %s, precision %s"
             "%s", cfg.run_name, par.backend, world, batch, microbatch, device, precision,
             ", activation checkpointing per block" if par.activation_checkpointing else "")
    return run
