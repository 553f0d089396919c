"""Counter-based random streams: reproducible, per-rank, resumable from two integers.

Draw ``i`` of a stream comes from a ``torch.Generator`` seeded with ``mix_seed(seed, rank, i, ...)`` on the
device where it is needed, so the whole state of a stream is ``(seed, calls)``. It can be saved in a
checkpoint, restored on another device or world size, and never depends on the global RNG (which Composer
0.32 does not restore when a run resumes in the middle of an epoch).
"""

from __future__ import annotations

from typing import Any

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers into one 63-bit seed (stable across runs, machines and Python versions)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class SeedStream:
    """A stream of seeds ``mix(seed, rank, 0), mix(seed, rank, 1), …``.

    Args:
        seed: Base seed.
        rank: Data-parallel rank mixed into every seed, so ranks draw independently.
    """

    def __init__(self, seed: int = 0, rank: int = 0) -> None:
        self.seed = int(seed)
        self.rank = int(rank)
        self.calls = 0

    def next_seed(self) -> int:
        """The seed of the next draw; advances the stream."""
        s = mix_seed(self.seed, self.rank, self.calls)
        self.calls += 1
        return s

    def next_generator(self, device: torch.device | str) -> torch.Generator:
        return seeded_generator(device, self.next_seed())

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "calls": self.calls}

    def load_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.calls = int(state["calls"])


def sample_seeds(seed: int, step: int, ids: list[int]) -> list[int]:
    """One seed per training sample: ``mix(seed, step, id)``.

    Keyed by the sample's dataset id rather than by rank or position, the draws of a step do not depend on
    the world size, the rank a sample lands on, the micro-batch split or a resumption.
    """
    return [mix_seed(seed, step, int(i)) for i in ids]


class BatchRandom:
    """Uniform and normal draws for a batch: from one generator, or from one generator per sample.

    Successive calls continue the same streams, so ``normal()`` then ``normal(C, H, W)`` draws a noise level
    and then noise, per sample.

    Args:
        batch: Batch size B.
        device: Device of the draws.
        generator: One generator for the whole batch (the global RNG when ``None`` and no ``sample_seeds``).
        sample_seeds: One seed per sample (see :func:`sample_seeds`); takes precedence over ``generator``.
    """

    def __init__(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None,
                 sample_seeds: list[int] | None = None) -> None:
        if sample_seeds is not None and len(sample_seeds) != batch:
            raise ValueError(f"got {len(sample_seeds)} sample seeds for a batch of {batch}")
        self.batch = batch
        self.device = device
        self.generator = generator
        self.per_sample = None if sample_seeds is None else [seeded_generator(device, s) for s in sample_seeds]

    def _draw(self, fn, shape: tuple[int, ...]) -> torch.Tensor:
        if self.per_sample is None:
            return fn((self.batch, *shape), generator=self.generator, device=self.device)
        return torch.stack([fn(shape, generator=g, device=self.device) for g in self.per_sample])

    def normal(self, *shape: int) -> torch.Tensor:
        return self._draw(torch.randn, shape)

    def uniform(self, *shape: int) -> torch.Tensor:
        return self._draw(torch.rand, shape)

