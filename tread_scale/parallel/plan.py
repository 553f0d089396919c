"""``tread-scale dry-run``: check a config and sharding plan, count parameters and FLOPs, estimate memory.

Everything is derived without a GPU: the model is built on the meta device.
The memory model is :mod:`tread_scale.parallel.memory`; the batch and checkpointing choice is
:mod:`tread_scale.parallel.choose`.

With aspect-ratio buckets (:class:`BucketSet`: ``dry-run --buckets SPEC`` or a local bucketed dataset) the
report adds one line per bucket (FLOPs per image, memory per rank) and sizes the memory plan, its
``--gpu-memory`` verdict and ``--choose`` for the bucket with the most image tokens when it has more than the
configured ``model.input_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tread_scale.config import RunConfig, validate_parallelism
from tread_scale.data.conversion.buckets import parse_buckets
from tread_scale.errors import ConfigError
from tread_scale.factory import build_net
from tread_scale.models.dit import DiT
from tread_scale.models.mmdit import MMDiT
from tread_scale.models.flops import Flops, model_flops
from tread_scale.parallel.choose import choice_report
from tread_scale.parallel.memory import GiB, estimate_memory, parse_bytes
from tread_scale.routing.routes import resolve_routes, scale_routes

if TYPE_CHECKING:
    from tread_scale.data.metadata import LatentMetadata

#: Pixels per latent side of ``--buckets`` sizes: every recipe's VAE (SD's, SD3's) downsamples 8x.
VAE_FACTOR = 8


@dataclass(frozen=True)
class Bucket:
    """One aspect-ratio bucket.

    Attributes:
        latent_hw: Latent ``(h, w)``.
        pixels: Image ``(width, height)`` in pixels; ``None`` where a dataset does not record it.
    """

    latent_hw: tuple[int, int]
    pixels: tuple[int, int] | None = None

    @property
    def latent(self) -> str:
        """The latent size as ``WxH`` (the order of pixel sizes)."""
        return f"{self.latent_hw[1]}x{self.latent_hw[0]}"

    def describe(self) -> str:
        """``WxH px``, or ``latent WxH`` when the pixel size is not known."""
        return f"{self.pixels[0]}x{self.pixels[1]} px" if self.pixels else f"latent {self.latent}"


@dataclass(frozen=True)
class BucketSet:
    """The buckets a plan covers.

    Attributes:
        source: Where they come from, for the report and errors (``--buckets SPEC``, ``data.remote=...``).
        buckets: The buckets, in order.
        factor: Pixels per latent side the pixel sizes were turned into latents with (``--buckets``: the VAE's
            8); ``None`` for a dataset's buckets, which record both sizes.
    """

    source: str
    buckets: tuple[Bucket, ...]
    factor: int | None = None


def buckets_from_spec(spec: str, factor: int = VAE_FACTOR) -> BucketSet:
    """The buckets of ``dry-run --buckets SPEC``: pixel sizes, latents ``factor`` times smaller.

    Raises:
        ConfigError: If the spec is malformed or a side is not a multiple of ``factor`` (naming the entry).
    """
    parsed = parse_buckets(spec, multiple=factor)
    return BucketSet(f"--buckets {spec}", tuple(Bucket((h // factor, w // factor), (w, h)) for w, h in parsed.buckets),
                     factor)


def buckets_from_metadata(meta: LatentMetadata, where: str) -> BucketSet | None:
    """A bucketed dataset's buckets (its metadata's ``buckets``, in order); ``None`` for a square dataset."""
    if not meta.buckets:
        return None
    out = []
    for b in meta.buckets:
        _, h, w = (int(x) for x in b["latent_shape"])
        size = b.get("image_size")  # [H, W] pixels
        out.append(Bucket((h, w), (int(size[1]), int(size[0])) if size else None))
    return BucketSet(where, tuple(out))


def bucket_tokens(net: DiT | MMDiT, bucket: Bucket, buckets: BucketSet) -> int:
    """Image tokens per sample of ``bucket`` (one of ``buckets``).

    Raises:
        ConfigError: Naming the bucket and its source, if the patch does not divide its latent sides.
    """
    try:
        return net.tokens_for(bucket.latent_hw)
    except ValueError:
        p = net.patch_size
        pixels = f", pixel sides multiples of {buckets.factor * p}" if buckets.factor else ""
        raise ConfigError(f"{buckets.source}: bucket {bucket.describe()} has a {bucket.latent} latent (W x H), whose "
                          f"sides the model's patch {p} does not divide (latent sides must be multiples of {p}"
                          f"{pixels})") from None


def bucket_lines(cfg: RunConfig, net: DiT | MMDiT, buckets: BucketSet, world_size: int, microbatch: int,
                 gpu: bool) -> tuple[list[str], tuple[int, int] | None]:
    """The dry-run lines of ``buckets`` and the latent size the memory plan is sized for.

    Returns:
        A header, one line per bucket (:func:`_bucket_line`) and a line naming what the plan is sized for;
        and the latent ``(H, W)`` of the bucket with the most image tokens when it has more than the configured
        ``model.input_size`` (``None``: the configured size).

    Raises:
        ConfigError: If the patch does not divide a bucket's latent sides (naming the bucket).
    """
    vae = f"; latents {buckets.factor}x smaller: an {buckets.factor}x VAE" if buckets.factor else ""
    lines = [f"buckets       {len(buckets.buckets)} from {buckets.source} (sizes W x H{vae}); forward GFLOP per "
             f"image dense / routed; memory per rank at micro-batch {microbatch}"]
    largest, most = None, 0
    for b in buckets.buckets:
        tokens = bucket_tokens(net, b, buckets)
        lines.append(_bucket_line(cfg, net, b, tokens, world_size, microbatch, gpu))
        if tokens > most:
            largest, most = b, tokens
    n, configured = net.num_tokens, f"the configured model.input_size {cfg.model.input_size}"
    if most > n:
        sized = (f"bucket {largest.describe()}: the most image tokens, {most} (more than {configured}'s {n}); the "
                 "memory plan below uses them")
    elif most == n:
        sized = f"bucket {largest.describe()}: the most image tokens, {most} (as many as {configured}'s)"
    else:
        sized = f"{configured}: {n} image tokens, more than any bucket's (the most: {largest.describe()}, {most})"
    return lines + [f"sized for     {sized}"], largest.latent_hw if most > n else None


def _bucket_line(cfg: RunConfig, net: DiT | MMDiT, bucket: Bucket, tokens: int, world_size: int, microbatch: int,
                 gpu: bool) -> str:
    """One bucket's line: pixel and latent size, image tokens, forward GFLOP per image dense / routed (routing
    aware) and memory per rank at ``microbatch``."""
    flops = model_flops(net, cfg.routes, latent_hw=bucket.latent_hw)
    mem = estimate_memory(cfg, net, world_size, microbatch, gpu, num_tokens=tokens)
    pixels = f"{bucket.pixels[0]}x{bucket.pixels[1]} px" if bucket.pixels else "? px"
    return (f"  bucket      {pixels:>12}  latent {bucket.latent:>7}  {tokens:>6} tokens  forward "
            f"{flops.dense / 1e9:.2f} / {flops.routed / 1e9:.2f} GFLOP  memory {mem.total / GiB:.2f} GiB")


def dry_run(cfg: RunConfig, world_size: int, gpu_memory: str | None = None, projection=None,
            max_nodes: int = 128, choose=None, buckets: BucketSet | None = None) -> str:
    """Validate ``cfg`` for ``world_size`` ranks and return a human-readable report.

    Args:
        cfg: The run.
        world_size: Ranks to plan for.
        gpu_memory: Memory per GPU to check the estimate against (e.g. ``"80GB"``).
        projection: :class:`~tread_scale.parallel.scaling.Assumptions` to also project step time and weak
            scaling from 1 to ``max_nodes`` nodes with (``None``: no projection).
        max_nodes: Largest node count of the projection.
        choose: :class:`~tread_scale.parallel.scaling.Assumptions` to also choose the micro-batch and activation
            checkpointing with (:mod:`tread_scale.parallel.choose`; needs ``gpu_memory``), or ``None``.
        buckets: Aspect-ratio buckets to report and to size the memory plan for (:func:`bucket_lines`), or
            ``None`` (the configured ``model.input_size`` only).

    Raises:
        ConfigError: For a plan that cannot run (batch split, mesh, ZeRO options, …), or a bucket the patch
            does not divide.
    """
    if world_size < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world_size}")
    validate_parallelism(cfg.parallelism, world_size)
    gbs = cfg.train.global_batch_size
    if gbs % world_size:
        raise ConfigError(f"train.global_batch_size={gbs} is not divisible by the world size {world_size}")
    per_rank = gbs // world_size
    microbatch = cfg.train.device_microbatch_size or per_rank
    if per_rank % microbatch:
        raise ConfigError(f"train.device_microbatch_size={microbatch} does not divide the per-rank batch {per_rank}")
    with torch.device("meta"):
        net = build_net(cfg.model)
    params = sum(p.numel() for p in net.parameters())
    flops = model_flops(net, cfg.routes)
    gpu = gpu_memory is not None or cfg.train.device == "gpu"
    per_bucket, planned = bucket_lines(cfg, net, buckets, world_size, microbatch, gpu) if buckets else ([], None)
    planned_tokens = net.tokens_for(planned) if planned else None
    mem = estimate_memory(cfg, net, world_size, microbatch, gpu, num_tokens=planned_tokens)
    size, patch = cfg.model.size()
    lines = [
        f"model         {cfg.model.name or 'custom'}: depth {size.depth}, width {size.hidden_size}, "
        f"{size.num_heads} heads, patch {patch}, {net.num_tokens} tokens of {cfg.model.in_channels}x"
        f"{cfg.model.input_size}x{cfg.model.input_size} latents"
        + (f" + {net.text_len} text tokens of width {net.text_dim} (never routed)" if hasattr(net, "text_len") else ""),
        f"parameters    {params:,} ({params / 1e6:.1f}M)",
        f"routes        " + (", ".join(f"{r.start}->{r.end} @ {r.rate}" for r in resolve_routes(cfg.routes, size.depth))
                             or "none (dense)"),
        f"FLOPs/image   forward {flops.dense / 1e9:.2f} GFLOP dense, {flops.routed / 1e9:.2f} GFLOP routed "
        f"(x{flops.routed / flops.dense:.3f}; blocks alone x{flops.blocks_routed / flops.blocks_dense:.3f}); "
        f"training (3x forward) {flops.train_dense / 1e9:.2f} / {flops.train_routed / 1e9:.2f} GFLOP",
        *schedule_lines(cfg, net, flops),
        *per_bucket,
        f"plan          {cfg.parallelism.backend} over {world_size} rank(s): global batch {gbs}, {per_rank} per rank, "
        f"micro-batch {microbatch}" + (", activation checkpointing" if cfg.parallelism.activation_checkpointing else ""),
        "memory/rank   " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in mem.terms.items()) + " GiB",
        f"              total {mem.total / GiB:.2f} GiB (training state {mem.training_state / GiB:.2f} GiB)"
        + (("; on the host: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in mem.host.items()) + " GiB") if mem.host else ""),
        f"save/host     checkpoint {sum(mem.checkpoint_host.values()) / GiB:.2f} GiB on the busiest rank ("
        + ", ".join(f"{k} {v / GiB:.2f}" for k, v in mem.checkpoint_host.items())
        + f"); EMA export {mem.export_host / GiB:.2f} GiB on rank 0 (streamed), none elsewhere",
    ]
    if gpu_memory is not None:
        cap = parse_bytes(gpu_memory)
        verdict = "fits" if mem.total <= 0.9 * cap else "DOES NOT FIT"
        lines.append(f"GPU memory    {cap / GiB:.0f} GiB per GPU: {verdict} ({100 * mem.total / cap:.0f}% of it; "
                     "allocator fragmentation and CUDA context add roughly 10%)")
    if choose is not None:
        if gpu_memory is None:
            raise ConfigError("--choose needs --gpu-memory (the memory the choice must fit in)")
        sized_flops = model_flops(net, cfg.routes, latent_hw=planned) if planned else flops
        lines += choice_report(cfg, net, world_size, parse_bytes(gpu_memory), choose,
                               run_train_flops(cfg, net, sized_flops, planned), sized_flops, planned_tokens)
    if projection is not None:
        from tread_scale.parallel.scaling import projection_report

        lines += projection_report(cfg, net, run_train_flops(cfg, net, flops), per_rank, projection, max_nodes)
    return "\n".join(lines)


def _duration_batches(cfg: RunConfig) -> int | None:
    text = str(cfg.train.max_duration).strip()
    return int(text[:-2]) if text.endswith("ba") and text[:-2].isdigit() else None


def run_train_flops(cfg: RunConfig, net: DiT | MMDiT, flops: Flops, latent_hw: tuple[int, int] | None = None
                    ) -> float:
    """Training FLOPs per image averaged over the run: the routed figure, or under a routing schedule the mean
    over ``train.max_duration``'s batches of each stage's figure (the routed figure when not in batches); at
    ``latent_hw`` (``flops`` must be of that size), else the configured size."""
    schedule, total = cfg.routing.schedule, _duration_batches(cfg)
    if schedule.is_constant or total is None:
        return flops.train_routed
    return schedule.mean_of(total, lambda f: model_flops(net, scale_routes(cfg.routes, f),
                                                         latent_hw=latent_hw).train_routed)


def schedule_lines(cfg: RunConfig, net: DiT | MMDiT, flops: Flops) -> list[str]:
    """The dry-run lines of a routing schedule: its stages and the run's mean training FLOPs."""
    schedule = cfg.routing.schedule
    if schedule.is_constant:
        return []
    total = _duration_batches(cfg)
    line = f"schedule      {schedule.describe(total)}"
    if total is None:
        return [line + f" (train.max_duration={cfg.train.max_duration} is not in batches: no run average)"]
    mean = run_train_flops(cfg, net, flops)
    return [line, f"              training FLOPs/image over the run's {total} batches: mean {mean / 1e9:.2f} GFLOP "
                  f"(x{mean / flops.train_dense:.3f} of dense; full rates alone x{flops.train_routed / flops.train_dense:.3f})"]


__all__ = ["VAE_FACTOR", "Bucket", "BucketSet", "bucket_lines", "bucket_tokens", "buckets_from_metadata",
           "buckets_from_spec", "dry_run", "run_train_flops", "schedule_lines"]
