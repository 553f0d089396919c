"""``tread-scale dry-run``: validate a config and sharding plan; parameters, FLOPs, memory per GPU."""

from __future__ import annotations

import argparse
import sys

from tread_scale.cli.common import add_overrides

NAME = "dry-run"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dry-run``."""
    p = sub.add_parser(NAME, help="validate a config and sharding plan; parameters, FLOPs, memory per GPU",
                       intermixed=True)
    add_overrides(p)
    p.add_argument("--world-size", type=int, required=True, help="total ranks (GPUs)")
    p.add_argument("--gpu-memory", help="memory per GPU to check against, e.g. 80GB")
    p.add_argument("--buckets", metavar="SPEC",
                   help="aspect-ratio buckets to plan for, in pixels: AREApx:MULT (e.g. 1024px:64, SDXL-style buckets "
                        "of about AREA^2 pixels) or WIDTHxHEIGHT,... (e.g. 1024x1024,1216x832); latents are 8x "
                        "smaller (every recipe uses an 8x VAE) and the patch must divide their sides. Prints FLOPs "
                        "and memory per bucket and sizes the memory plan for the bucket with the most tokens. "
                        "Default: a local bucketed data.remote's own buckets")
    p.add_argument("--choose", action="store_true",
                   help="pick the micro-batch and activation checkpointing that are fastest within --gpu-memory "
                        "(step time from the projection's assumptions below)")
    g = p.add_argument_group("projection", "step time and weak-scaling efficiency from 1 to N nodes")
    g.add_argument("--project", action="store_true", help="add the projection (per-GPU batch as planned here)")
    g.add_argument("--max-nodes", type=int, default=128)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16 peak per GPU (H100 SXM: 989.4)")
    g.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation of the compute")
    g.add_argument("--nvlink-gbps", type=float, default=360.0, help="GB/s per GPU inside a node (NCCL bus bw)")
    g.add_argument("--network-gbps", type=float, default=45.0, help="GB/s per GPU between nodes")
    g.add_argument("--latency-us", type=float, default=5.0, help="per hop of a collective (log2(group) hops)")
    g.add_argument("--overlap", type=float, default=0.8, help="fraction of compute time hiding communication")
    return p


def run(args: argparse.Namespace) -> int:
    """Print the plan (and the projection with ``--project``)."""
    from tread_scale.config import load_config
    from tread_scale.parallel.plan import buckets_from_spec, dry_run

    from tread_scale.parallel.scaling import Assumptions

    assumptions = Assumptions(peak_tflops=args.peak_tflops, mfu=args.mfu, gpus_per_node=args.gpus_per_node,
                              nvlink_gbps=args.nvlink_gbps, network_gbps=args.network_gbps,
                              latency_us=args.latency_us, overlap=args.overlap)
    cfg = load_config(args.config, args.overrides)
    source = adopt_local_text_shape(cfg)
    buckets = buckets_from_spec(args.buckets) if args.buckets else local_buckets(cfg.data.remote)
    report = dry_run(cfg, args.world_size, args.gpu_memory, assumptions if args.project else None, args.max_nodes,
                     choose=assumptions if args.choose else None, buckets=buckets)
    if source:
        report = f"text          {source}\n" + report
    sys.stdout.write(report + "\n")
    return 0


def local_buckets(remote: str):
    """The buckets of ``data.remote`` when it is a local bucketed dataset (its ``tread_meta.json``), else ``None``.

    Returns:
        A :class:`~tread_scale.parallel.plan.BucketSet`, or ``None`` for an ``s3://`` prefix (not read by
        dry-run), a folder without metadata or a square dataset.

    Raises:
        DatasetError: If the metadata file is malformed.
    """
    from pathlib import Path

    from tread_scale.data import object_store as s3
    from tread_scale.data.metadata import META_FILE, read_metadata
    from tread_scale.parallel.plan import buckets_from_metadata

    if not remote or s3.is_s3(remote) or not Path(remote, META_FILE).is_file():
        return None
    return buckets_from_metadata(read_metadata(remote), f"data.remote={remote}")


def adopt_local_text_shape(cfg) -> str:
    """A text model planned on a local dataset plans with that dataset's text widths and length.

    Returns:
        What the plan's text shape comes from, for the report ("" for a DiT).

    Raises:
        ConfigError: If ``data.remote`` is a local folder that does not exist or holds no MDS dataset.
        DatasetMismatchError: If a set text width or length differs from the dataset's.
    """
    from pathlib import Path

    from tread_scale.data import object_store as s3
    from tread_scale.data.metadata import adopt_text_shape, read_metadata
    from tread_scale.errors import ConfigError

    if cfg.model.model_family() != "mmdit":
        return ""
    remote = cfg.data.remote
    if s3.is_s3(remote):
        return (f"widths and length as configured (data.remote={remote} is not read by dry-run; a run checks them "
                "against the dataset at start)")
    if not Path(remote, "index.json").is_file():
        raise ConfigError(f"data.remote={remote!r}: no MDS dataset there (no index.json); dry-run reads a local "
                          "dataset's text shape, so point it at the converted data or at an s3:// prefix")
    adopt_text_shape(cfg.model, read_metadata(remote), remote)
    return f"{cfg.model.text_len} tokens of width {cfg.model.text_dim}, pooled {cfg.model.pooled_dim}, from {remote}"
