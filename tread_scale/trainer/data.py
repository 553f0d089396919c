"""The training data of a run: access checks against the model, then the batched streaming loader."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tread_scale.config import RunConfig
from tread_scale.data import object_store as s3
from tread_scale.data.metadata import LatentMetadata, check_against_model, read_metadata
from tread_scale.errors import ConfigError

log = logging.getLogger(__name__)


def prepare_data_access(cfg: RunConfig) -> LatentMetadata:
    """Check the object store (data and checkpoints) and the dataset's facts against the model; return them."""
    if s3.is_s3(cfg.data.remote):
        s3.check_s3_access(cfg.data.remote)
    if s3.is_s3(cfg.checkpoint_folder()):
        s3.check_s3_access(cfg.checkpoint_folder())
    meta = read_metadata(cfg.data.remote)
    text_model = cfg.model.model_family() == "mmdit"
    check_against_model(meta, in_channels=cfg.model.in_channels, input_size=cfg.model.input_size,
                        num_classes=max(meta.num_classes, 1) if text_model else cfg.model.num_classes,
                        where=cfg.data.remote)
    if text_model:
        adopt_text_widths(cfg, meta)
    check_buckets_against_model(cfg, meta)
    return meta


def check_buckets_against_model(cfg: RunConfig, meta: LatentMetadata) -> None:
    """Every bucket of a bucketed dataset must be a grid the model can run
    (:meth:`~tread_scale.models.patched.PatchTokenNet.check_latent_size`: sides divisible by the patch, within a
    position table of fixed size). The model is built on the meta device to ask it.

    Raises:
        DatasetMismatchError: Naming the dataset, the bucket and what the model cannot do.
    """
    from tread_scale.errors import DatasetMismatchError
    from tread_scale.factory import build_net

    if not meta.buckets:
        return
    with torch.device("meta"):
        net = build_net(cfg.model)
    for b in meta.buckets:
        _, h, w = (int(x) for x in b["latent_shape"])
        try:
            net.check_latent_size(h, w)
        except ValueError as e:
            raise DatasetMismatchError(f"{cfg.data.remote}: bucket {h}x{w} (latent): {e}") from None


def adopt_text_widths(cfg: RunConfig, meta: LatentMetadata) -> None:
    """A text-conditioned model takes the dataset's text widths and length (:func:`~tread_scale.data.metadata.
    adopt_text_shape`); the ``text`` section's encoders must be the dataset's.

    Raises:
        DatasetMismatchError: If the dataset has no captions or its widths or length differ from the model's.
        ConfigError: If the ``text`` section's encoders are not the ones the dataset was converted with.
    """
    from tread_scale.data.conversion.text_encoder import check_text_encoders
    from tread_scale.data.metadata import adopt_text_shape

    where = cfg.data.remote
    adopt_text_shape(cfg.model, meta, where)
    if any(cfg.text.folders().values()):
        check_text_encoders(meta, **cfg.text.folders(), where=where)


def build_dataloader(cfg: RunConfig, meta: LatentMetadata, batch_size: int) -> DataLoader:
    """The training DataLoader over a batched :class:`LatentStreamingDataset` (never wrapped).

    Each node reads through its own cache folder (:mod:`tread_scale.data.stream.location`).
    """
    from composer.utils import dist

    from tread_scale.data.stream.dataset import BatchLoader, LatentStreamingDataset
    from tread_scale.data.stream.location import stream_location

    d = cfg.data
    if not s3.is_s3(d.remote) and not Path(d.remote, "index.json").is_file():
        raise ConfigError(f"data.remote={d.remote!r}: no index.json there (not an MDS dataset)")
    location = stream_location(d.remote, cfg.data_cache(dist.get_node_rank()), d.split)
    if location["remote"] is not None and not s3.is_s3(d.remote):
        log.info("data.remote=%s has compressed shards: decompressing them into this node's cache %s", d.remote,
                 location["local"])
    if d.cache_limit is not None and location["remote"] is None:
        log.warning("data.cache_limit is set for a dataset read in place; streaming may evict shards it cannot "
                    "download again (mosaicml/streaming#988). Ignoring cache_limit.")
    text_model = cfg.model.model_family() == "mmdit"
    dataset = LatentStreamingDataset(
        latent_shape=tuple(meta.latent_shape),
        num_classes=max(meta.num_classes, 1) if text_model else cfg.model.num_classes,
        text_shape=meta.text.shape if text_model else None,
        captions=False,
        buckets=getattr(meta, "buckets", None),
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
