"""Checkpoints of a run: where they go (local or ``s3://``), what is repaired or set aside before a resume,
and the clear error for a disk that fills up while writing one.

``local.py`` handles the local folder (orphans newer than ``latest``), ``remote.py`` object storage
(manifests of complete uploads, repair of the remote ``latest`` pointer).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tread_scale.config import RunConfig
from tread_scale.data import object_store as s3
from tread_scale.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class Checkpointing:
    """What checkpointing adds to the ``Trainer``: callbacks, loggers and Composer's ``save_folder``."""

    save_folder: str | None
    callbacks: list = field(default_factory=list)
    loggers: list = field(default_factory=list)


def local_checkpoint_folder(cfg: RunConfig) -> Path:
    """Where checkpoints are written locally (the folder itself, or the staging folder of an s3:// one)."""
    ckpt = cfg.checkpoint_folder()
    return cfg.run_dir / "checkpoints" if s3.is_s3(ckpt) else Path(ckpt)


def build_checkpointing(cfg: RunConfig, rank: int) -> Checkpointing:
    """Prepare the checkpoint folder for (auto)resume and say how Composer writes and uploads checkpoints.

    Collective: every rank must call it (it waits for the repairs of rank 0 / local rank 0).
    """
    from composer.utils import dist

    par, ckpt = cfg.parallelism, cfg.checkpoint_folder()
    out = Checkpointing(save_folder=ckpt)
    manifests = s3.is_s3(ckpt) and par.backend != "deepspeed" and not (
        par.backend == "fsdp" and par.fsdp.state_dict_type == "sharded")
    if manifests:
        from tread_scale.trainer.checkpointing.remote import CheckpointManifests, repair_remote_latest

        out.callbacks.append(CheckpointManifests(ckpt))
        if cfg.train.autoresume and rank == 0:
            repair_remote_latest(ckpt)
        dist.barrier()
    if cfg.train.autoresume:
        from tread_scale.trainer.checkpointing.local import set_aside_orphans

        if dist.get_local_rank() == 0:
            set_aside_orphans(local_checkpoint_folder(cfg))
        dist.barrier()
    if s3.is_s3(ckpt):
        # Stage checkpoints in the run folder and upload them through a logger destination. (Handing Composer
        # the s3:// URI as save_folder makes it stage and download checkpoints under ./s3:/<bucket>/… in the
        # current directory, where a later run of the same name would resume from a stale copy.)
        from composer.callbacks import CheckpointSaver
        from composer.loggers import RemoteUploaderDownloader

        bucket, prefix = s3.parse_s3_uri(ckpt)
        out.callbacks.append(CheckpointSaver(
            folder=str(local_checkpoint_folder(cfg)), filename="ep{epoch}-ba{batch}-rank{rank}.pt",
            remote_file_name=f"{prefix}/ep{{epoch}}-ba{{batch}}-rank{{rank}}.pt", latest_filename="latest-rank{rank}.pt",
            latest_remote_file_name=f"{prefix}/latest-rank{{rank}}.pt", save_interval=cfg.train.save_interval,
            num_checkpoints_to_keep=cfg.train.save_num_checkpoints_to_keep))
        # threads, not processes: a failed upload then surfaces as an error instead of a dead worker process
        # whose (unpicklable botocore) exception never arrives, which leaves Composer waiting for ever
        out.loggers.append(RemoteUploaderDownloader(bucket_uri=f"s3://{bucket}", num_concurrent_uploads=1,
                                                    upload_staging_folder=str(cfg.run_dir / ".upload_staging"),
                                                    use_procs=False))
        out.save_folder = None
    return out


def enospc_in(exc: BaseException) -> OSError | None:
    """The ``ENOSPC`` error in an exception's chain (torch.save re-raises it as a RuntimeError), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def no_space_error(cfg: RunConfig) -> CheckpointError:
    """A clear error for a checkpoint that did not fit; removes the partial file, keeps the last good one."""
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
