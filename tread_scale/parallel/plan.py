"""``tread-scale dry-run``: check a config and sharding plan, count parameters and FLOPs, estimate memory.

Everything is derived without a GPU: the model is built on the meta device.
The memory model is :mod:`tread_scale.parallel.memory`; the batch and checkpointing choice is
:mod:`tread_scale.parallel.choose`.
"""

from __future__ import annotations

import torch

from tread_scale.config import RunConfig, validate_parallelism
from tread_scale.errors import ConfigError
from tread_scale.factory import build_net
from tread_scale.models.dit import DiT
from tread_scale.models.mmdit import MMDiT
from tread_scale.models.flops import Flops, model_flops
from tread_scale.parallel.choose import choice_report
from tread_scale.parallel.memory import GiB, estimate_memory, parse_bytes
from tread_scale.routing.routes import resolve_routes, scale_routes

def dry_run(cfg: RunConfig, world_size: int, gpu_memory: str | None = None, projection=None,
            max_nodes: int = 128, choose=None) -> str:
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

    Raises:
        ConfigError: For a plan that cannot run (batch split, mesh, ZeRO options, …).
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
    mem = estimate_memory(cfg, net, world_size, microbatch, gpu)
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
        lines += choice_report(cfg, net, world_size, parse_bytes(gpu_memory), choose, run_train_flops(cfg, net, flops),
                               flops)
    if projection is not None:
        from tread_scale.parallel.scaling import projection_report

        lines += projection_report(cfg, net, run_train_flops(cfg, net, flops), per_rank, projection, max_nodes)
    return "\n".join(lines)


def _duration_batches(cfg: RunConfig) -> int | None:
    text = str(cfg.train.max_duration).strip()
    return int(text[:-2]) if text.endswith("ba") and text[:-2].isdigit() else None


def run_train_flops(cfg: RunConfig, net: DiT | MMDiT, flops: Flops) -> float:
    """Training FLOPs per image averaged over the run: the routed figure, or under a routing schedule the mean
    over ``train.max_duration``'s batches of each stage's figure (the routed figure when not in batches)."""
    schedule, total = cfg.routing.schedule, _duration_batches(cfg)
    if schedule.is_constant or total is None:
        return flops.train_routed
    return schedule.mean_of(total, lambda f: model_flops(net, scale_routes(cfg.routes, f)).train_routed)


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


__all__ = ["dry_run", "run_train_flops", "schedule_lines"]
