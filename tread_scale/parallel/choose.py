"""``dry-run --choose``: the micro-batch and activation checkpointing that the plan says are fastest within memory.

For the configured global batch and world size (so the per-rank batch is fixed), every micro-batch that
divides the per-rank batch is tried with and without activation checkpointing. Each option gets the memory
estimate of :func:`~tread_scale.parallel.plan.estimate_memory` and a step time from the same stated
assumptions as the projection (:mod:`tread_scale.parallel.scaling`):

* compute: per-rank images × training FLOPs per image (the run's mean under a routing schedule), plus one
  more forward pass of the blocks with checkpointing (recomputation), at the stated MFU of the stated peak;
* communication: the backend's collectives per step; backends that gather parameters for compute (FSDP,
  ZeRO-3) gather them again for every micro-batch, so theirs count once per micro-batch;
* exposed communication: what the stated overlap fraction of the compute time does not hide.

The chosen option is the fastest that fits in 90% of the GPU memory (ties: the larger micro-batch, then no
checkpointing). MFU is taken as the same for every micro-batch, which flatters small micro-batches: a
larger micro-batch only wins here when it saves communication or recomputation. The report also names the
largest per-rank batch that would fit without checkpointing, for users who can change the world size or
the global batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tread_scale.errors import ConfigError
from tread_scale.models.flops import Flops
from tread_scale.parallel.memory import estimate_memory
from tread_scale.parallel.scaling import Assumptions, comm_seconds, comm_shape

GiB = 1024**3
#: Fraction of the GPU's memory a plan may use (allocator fragmentation and the CUDA context take the rest).
USABLE = 0.9


@dataclass(frozen=True)
class Option:
    """One micro-batch and checkpointing choice, with its estimated memory and step time."""

    microbatch: int
    checkpointing: bool
    memory: float
    compute_s: float
    comm_s: float
    step_s: float
    fits: bool

    def describe(self) -> str:
        ckpt = "activation checkpointing" if self.checkpointing else "no checkpointing"
        verdict = "" if self.fits else "  (does not fit)"
        return (f"micro-batch {self.microbatch:>3}, {ckpt:<24} {self.memory / GiB:7.2f} GiB, "
                f"step ~{self.step_s * 1e3:8.1f} ms (compute {self.compute_s * 1e3:.1f}, "
                f"communication {self.comm_s * 1e3:.1f}){verdict}")


def _divisors(n: int) -> list[int]:
    return sorted({d for k in range(1, math.isqrt(n) + 1) if n % k == 0 for d in (k, n // k)})


def _memory(cfg, net, world_size: int, microbatch: int, checkpointing: bool, num_tokens: int | None) -> float:
    par = dataclasses.replace(cfg.parallelism, activation_checkpointing=checkpointing)
    return estimate_memory(dataclasses.replace(cfg, parallelism=par), net, world_size, microbatch, True,
                           num_tokens=num_tokens).total


def plan_options(cfg, net, world_size: int, capacity: float, a: Assumptions, train_flops: float,
                 flops: Flops, num_tokens: int | None = None) -> list[Option]:
    """Every (micro-batch, checkpointing) option for ``cfg``'s per-rank batch, fastest first.

    Args:
        cfg: A validated run config (backend section resolved).
        net: The model (the meta device will do).
        world_size: Ranks.
        capacity: Bytes of one GPU's memory.
        a: Hardware and efficiency assumptions.
        train_flops: Training FLOPs per image the run averages (3x forward, routing-aware).
        flops: The model's forward FLOPs (for the recomputed blocks).
        num_tokens: Image tokens per sample to size memory for (the largest aspect-ratio bucket; ``None``: the
            configured size). ``train_flops`` and ``flops`` must be of the same size.
    """
    per_rank = cfg.train.global_batch_size // world_size
    par = cfg.parallelism
    comm_per = comm_seconds(comm_shape(cfg, net).collectives(cfg, world_size), a)
    regathers = par.backend == "fsdp" or (par.backend == "deepspeed" and par.deepspeed.zero_stage == 3)
    recompute = flops.blocks_routed / flops.routed * (train_flops / 3)  # one more forward of the blocks
    rate = a.mfu * a.peak_tflops * 1e12
    options = []
    for mb in _divisors(per_rank):
        for ckpt in (False, True):
            compute = per_rank * (train_flops + (recompute if ckpt else 0.0)) / rate
            comm = comm_per * (per_rank // mb if regathers else 1)
            step = compute + max(0.0, comm - a.overlap * compute)
            memory = _memory(cfg, net, world_size, mb, ckpt, num_tokens)
            options.append(Option(mb, ckpt, memory, compute, comm, step, memory <= USABLE * capacity))
    return sorted(options, key=lambda o: (not o.fits, o.step_s, -o.microbatch, o.checkpointing))


def largest_batch_without_checkpointing(cfg, net, world_size: int, capacity: float, limit: int = 4096,
                                        num_tokens: int | None = None) -> int:
    """The largest per-rank batch (one micro-batch, no checkpointing) that fits, 0 if none."""
    best, b = 0, 1
    while b <= limit and _memory(cfg, net, world_size, b, False, num_tokens) <= USABLE * capacity:
        best, b = b, b * 2
    if best:  # refine between best and 2·best
        lo, hi = best, min(2 * best, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            fits = _memory(cfg, net, world_size, mid, False, num_tokens) <= USABLE * capacity
            lo, hi = (mid, hi) if fits else (lo, mid)
        best = lo
    return best


def choice_report(cfg, net, world_size: int, capacity: float, a: Assumptions, train_flops: float,
                  flops: Flops, num_tokens: int | None = None) -> list[str]:
    """The ``dry-run --choose`` lines (``num_tokens``: see :func:`plan_options`).

    Raises:
        ConfigError: When no option fits in the GPU memory (naming the smallest estimate).
    """
    options = plan_options(cfg, net, world_size, capacity, a, train_flops, flops, num_tokens)
    per_rank = cfg.train.global_batch_size // world_size
    chosen = options[0]
    if not chosen.fits:
        smallest = min(options, key=lambda o: o.memory)
        raise ConfigError(f"--choose: no micro-batch of the per-rank batch {per_rank} fits in "
                          f"{USABLE:.0%} of {capacity / GiB:.0f} GiB, even {smallest.describe()}; use more ranks, a "
                          "smaller train.global_batch_size, ZeRO-3/FSDP or offloading")
    lines = [f"choice        per-rank batch {per_rank} (global {cfg.train.global_batch_size} over {world_size} ranks); "
             f"fastest within {USABLE:.0%} of {capacity / GiB:.0f} GiB; {a.describe()}"]
    for o in options:
        lines.append(("  -> " if o is chosen else "     ") + o.describe())
    lines.append(f"  use         train.device_microbatch_size={chosen.microbatch} "
                 f"parallelism.activation_checkpointing={str(chosen.checkpointing).lower()}")
    current = (cfg.train.device_microbatch_size or per_rank, cfg.parallelism.activation_checkpointing)
    if current != (chosen.microbatch, chosen.checkpointing):
        lines.append(f"  (the config has micro-batch {current[0]}, checkpointing {str(current[1]).lower()})")
    biggest = largest_batch_without_checkpointing(cfg, net, world_size, capacity, num_tokens=num_tokens)
    if biggest > per_rank:
        lines.append(f"  headroom    up to {biggest} images per rank fit without checkpointing (global "
                     f"{biggest * world_size} over {world_size} ranks, or this global batch over "
                     f"{max(1, cfg.train.global_batch_size // biggest)} ranks)")
    return lines


__all__ = ["Option", "plan_options", "choice_report", "largest_batch_without_checkpointing", "USABLE"]
